"""CODA-Prompt (Smith et al., CVPR 2023), on the suite's shared frozen ViT.

Each of layers 0-4 holds M prompt components; component m has a prompt P_m (Lp tokens, split
Lp/2 key + Lp/2 value prefix tokens), a key K_m and an attention vector A_m (both D-d). For the
frozen query q (final-LN [CLS] of the un-prompted ViT, no L2 norm) the weight of component m is

    alpha_m = cos(q * A_m, K_m)          (elementwise product; no softmax, no top-k)

and the layer's prefix is sum_m alpha_m P_m over the components allocated so far. The M
components are split evenly over the T tasks (M/T per task, 10 per task for 100 and 10 tasks).
While task t trains only its own slice learns: earlier slices are frozen (outside the optimizer,
so they stay bit-equal) and later ones unused. At the start of each task its slice is initialised
by Gram-Schmidt: random vectors made orthonormal to each other and to every earlier component
(current CODA code, since 605ac87). No task id at test: all components so far are used.

Size on ViT-B/16: 5 layers * 100 * (8*768 + 768 + 768) = 3,840,000 (docs/sources.md#cost).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Hparams, PromptModel, PromptStrategy, hparam
from .registry import register
from .vit import PromptedViT


@dataclass
class CodaHparams(Hparams):
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "cosine"
    n_components: int = hparam(100, ge=1)  # M per layer, split evenly over the tasks
    n_tasks: int = hparam(10, ge=1)  # T of the protocol (the slicing needs it up front, as in the code)
    prompt_length: int = hparam(8, ge=2)  # tokens per component: 4 key + 4 value
    layers: tuple[int, ...] = hparam((0, 1, 2, 3, 4), ge=0)
    ortho_weight: float = hparam(0.0, ge=0)  # mu of the orthogonality penalty (current code 0.0, paper 0.1)


def gram_schmidt(new: Tensor, old: Tensor) -> Tensor:
    """Rows of `new` (n, F) made orthonormal to each other and to the span of `old` (m, F).

    Modified Gram-Schmidt against an orthonormal basis of `old`, so the new rows are exactly
    orthogonal to every earlier component even when those have drifted from orthogonality
    during training (the reference projects on each earlier vector in turn)."""
    basis = [] if old.shape[0] == 0 else list(torch.linalg.qr(old.t()).Q.t())
    out = []
    for v in new:
        for u in basis:
            v = v - (v @ u) * u
        v = v / v.norm()
        basis.append(v)
        out.append(v)
    return torch.stack(out)


def ortho_penalty(t: Tensor) -> Tensor:
    """mean((t t^T - I)^2) over the rows of t: 0 when they are orthonormal."""
    eye = torch.eye(t.shape[0], device=t.device, dtype=t.dtype)
    return ((t @ t.t() - eye) ** 2).mean()


class CodaModel(PromptModel):
    """Per layer, per task slice: prompts P (k, Lp, D), keys K (k, D), attention A (k, D)."""

    def __init__(self, vit: PromptedViT, num_classes: int, hp: CodaHparams):
        super().__init__(vit, num_classes)
        m, t = hp.n_components, hp.n_tasks
        if m % t:
            raise ValueError(f"coda_prompt: n_components={m} must split evenly over n_tasks={t}")
        if m > vit.embed_dim:  # Gram-Schmidt needs room for M orthogonal D-d keys
            raise ValueError(f"coda_prompt: n_components={m} exceeds the embedding size "
                             f"{vit.embed_dim}; the keys cannot be orthogonal")
        if hp.prompt_length % 2:
            raise ValueError(f"coda_prompt: prompt_length={hp.prompt_length} must be even (K/V)")
        self.layers = tuple(hp.layers)
        self.n_tasks, self.per_task, self.length = t, m // t, hp.prompt_length
        d = vit.embed_dim

        def slices(*shape: int) -> nn.ModuleList:
            return nn.ModuleList(
                nn.ParameterList(nn.Parameter(torch.zeros(self.per_task, *shape)) for _ in range(t))
                for _ in self.layers)

        self.P, self.K, self.A = slices(hp.prompt_length, d), slices(d), slices(d)
        self.ortho_weight = hp.ortho_weight
        self.ortho: Tensor | None = None  # orthogonality penalty of the last training forward
        self.start_task(0)

    def _groups(self):
        for layer in range(len(self.layers)):
            for group in (self.P, self.K, self.A):
                yield group[layer]

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Gram-Schmidt-initialise task `task`'s slice and make it the only trainable one."""
        for group in self._groups():
            new = torch.randn_like(group[task].flatten(1))
            old = torch.cat([p.flatten(1) for p in group[:task]]) if task else new[:0]
            group[task].copy_(gram_schmidt(new, old).view_as(group[task]))
            for j, p in enumerate(group):
                p.requires_grad_(j == task)

    def prefixes(self, q: Tensor) -> dict[int, tuple[Tensor, Tensor]]:
        """{layer: (pk, pv)}, each (B, Lp/2, D): the alpha-weighted sum of components 0..task."""
        n = self.task_id + 1
        half = self.length // 2
        penalty = q.new_zeros(())
        out = {}
        for i, layer in enumerate(self.layers):
            P = torch.cat(list(self.P[i][:n]))  # (k, Lp, D)
            K = torch.cat(list(self.K[i][:n]))  # (k, D)
            A = torch.cat(list(self.A[i][:n]))
            # cos(q*A_m, K_m) without materialising (B, k, D): numerator q.(A_m*K_m/|K_m|),
            # denominator |q*A_m| = sqrt(q^2 . A_m^2)
            num = q @ (A * F.normalize(K, dim=-1)).t()
            den = ((q * q) @ (A * A).t()).sqrt().clamp_min(1e-12)
            alpha = num / den  # (B, k)
            prompt = torch.einsum("bk,kld->bld", alpha, P)
            out[layer] = (prompt[:, :half], prompt[:, half:])
            if self.training and self.ortho_weight > 0:
                penalty = penalty + ortho_penalty(K) + ortho_penalty(A) + ortho_penalty(P.flatten(1))
        self.ortho = penalty
        return out

    def features(self, x: Tensor) -> Tensor:
        return self.vit(x, prefix=self.prefixes(self.vit.query(x)))


@register("coda_prompt")
class CodaPrompt(PromptStrategy):
    """CODA-Prompt as the suite runs it (mechanism in the module docstring).

    Departures from the paper / official code (docs/sources.md#coda-prompt):
    - ortho_weight (mu) defaults to 0.0 as the current code (Gram-Schmidt init makes the penalty
      unnecessary, per its README); the paper uses 0.1 and the original release an extra hidden
      1e-6 factor. Configurable; the penalty covers all components so far (K, A, flattened P).
    - Gram-Schmidt against an orthonormal basis of the earlier components (exactly orthogonal);
      the code projects on each earlier component in turn (exact only while they stay orthogonal).
    - Earlier slices are frozen by leaving them out of the optimizer rather than by `detach()`, so
      they stay bit-equal whatever the optimizer (weight decay included).
    - Schedule: the suite's per-iteration cosine to 0. The code decays per epoch as
      cos(99*pi*e / (200*(E-1))) (GT-RIPL/CODA-Prompt utils/schedulers.py:53-54), but its
      scheduler resets `last_epoch` to -1 after its own `step(0)` (:19-20; :24-25 of the same file
      in the SMoPE code) and steps only from the second epoch on (learners/default.py:95), so
      epochs 0 and 1 run at the base rate and epoch e >= 1 at cos(99*pi*(e-1) / (200*(E-1))):
      the last of 20 epochs at about 9.7% of the base rate (cos(99*pi*18/3800) = 0.0974), not
      the formula's 1.6% at e = E-1.
    - CUB (not in the paper): 20 epochs, as VQ-Prompt's CUB runs of the CODA code base.
    - Logits: past classes masked in training CE and unseen classes at test, as the code.
    - fmnist-5t (64-d tiny ViT): 20 components (4 per task, fewer than the 64 dimensions so
      keys can be orthogonal), length 8 (4+4), 2 epochs, batch 32, lr 0.005 for the head and
      prompt_lr_mult 0.5 (prompts at 0.0025). The multiplier was chosen on seeds 0-1 among
      0.1 / 0.2 / 0.5 / 1.0; lr and epochs by the rule shared with head_only, L2P and DualPrompt
      (best FAA on seeds 0-1 among lr {0.005, 0.01, 0.02} x epochs {2, 3}, zero-init head; ties
      go to fewer epochs). Results and the diagnosis: docs/tuning.md.
    """

    description = "CODA-Prompt: attention-weighted prefix components (layers 0-4), new slice per task"
    Hparams = CodaHparams
    passes_train = 2
    passes_test = 2
    DEFAULTS = {
        "cifar100-10t": dict(epochs=20),
        "imagenet-r-5t": dict(epochs=50),
        "imagenet-r-10t": dict(epochs=50),
        "imagenet-r-20t": dict(epochs=50),
        "cub200-10t": dict(epochs=20),
        "fmnist-5t": dict(epochs=2, batch_size=32, lr=0.005, n_components=20,
                          prompt_lr_mult=0.5),
    }

    @classmethod
    def stream_hparams(cls, num_tasks: int, classes_per_task: list[int]) -> dict:
        return {"n_tasks": num_tasks}  # one slice of components per task

    def check_stream(self, num_tasks: int) -> None:
        if num_tasks != self.hp.n_tasks:
            raise ValueError(f"coda_prompt: the stream has {num_tasks} tasks but n_tasks="
                             f"{self.hp.n_tasks}; set n_tasks={num_tasks}")

    def build_model(self, vit: PromptedViT, num_classes: int) -> CodaModel:
        return CodaModel(vit, num_classes, self.hp)

    def task_start(self) -> None:
        t, n = self.task_id, self.hp.n_tasks
        stream = len(self.experience.origin_stream)
        if t >= n or stream != n:
            raise ValueError(f"coda_prompt: the stream has {stream} tasks but n_tasks={n}; "
                             f"set n_tasks={stream}")
        if t > 0:  # task 0's slice was initialised when the model was built
            self.model.start_task(t)

    def aux_loss(self) -> Tensor | None:
        if self.hp.ortho_weight > 0:
            return self.hp.ortho_weight * self.model.ortho
        return None

    def cost_forward(self, x: Tensor, training: bool) -> Tensor:
        """Untrained strategy: training cost at task 0, evaluation cost at the last task (all M
        components in the sum)."""
        if self.task_id < 0:
            self.current_classes = list(range(self.num_classes))
            self.seen_classes = list(range(self.num_classes))
            self.model.task_id = 0 if training else self.hp.n_tasks - 1
        self.model.train(training)
        return self.model(x)
