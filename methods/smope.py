"""SMoPE: "One-Prompt Strikes Back: Sparse Mixture of Experts for Prompt-based Continual Learning"
(ICLR 2026; official code github.com/Minhchuyentoancbn/SMoPE @ a7a42a7). Facts:
docs/sources.md#smope.

The idea in one paragraph. One shared prefix prompt sits in the first half of the blocks (0-5 of
ViT-B/16). In every prompted layer each head owns N_p = 25 "prompt experts", a prefix key and a
prefix value of head_dim each, living directly in that head's key/value space. Per image, layer
and head, the router scores every expert with the prompt-attention logit of the token-averaged
query, s_j = mean_i(q_i) . k_j (the "score aggregation"), keeps the top-K = 5 and drops the rest.
Each kept expert enters the ordinary softmax attention as one extra column whose logit tau * s_j
(tau = 1/sqrt(head_dim)) is the same for every query token (row expansion). The scores come from
the layer's own input in the same forward pass, so SMoPE needs ONE ViT pass at train and at test,
where L2P-style methods need a second, frozen query pass.

Around that mechanism (each has its section under docs/sources.md#smope):
- adaptive noise: activation counts F per expert, accumulated over tasks by a no-grad pass
  over each task's training data; at the start of every later task the experts with F >= the
  mean are flagged "frequently used" (sticky), and during training their selection score loses
  eps * (max_j s_j - min_j s_j), so new tasks are pushed toward rarely used experts;
- router loss: CE pushing the selected experts' raw scores above the others by that margin;
- prototype loss: the old keys of frequently used experts act as pseudo-queries whose
  top-K routing (under the old keys) the current keys must keep: prefix keys as implicit memory;
- schedule: task 0 starts with int(E/2) dense epochs (every expert, no router loss, fresh
  optimizer); after each task >= 1 the head is re-fit on Gaussian class statistics (the shared
  `methods.alignment`, HiDe's "task-adaptive prediction").

Every component is an hparam switch, and `ABLATION` lists the paper's cumulative ladder
(docs/sources.md#smope-secondary-notes) as labelled overrides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .alignment import AlignmentConfig, AlignmentStage, collect_features
from .base import Hparams, PromptModel, PromptStrategy, TaskStages, added_hparam, hparam
from .registry import register
from .vit import PromptedViT

# Test-time penalty (in units of the score range) of never-selected experts in the code's
# evaluation rule (`exclude_unused=True`): large enough to rank them below every other expert.
UNUSED_PENALTY = 2.0
# Extra coordinates appended to q/k/v in the fused path (one carries the expert score, the rest
# are zeros) so the head dimension stays a multiple of 8, which flash / memory-efficient SDPA
# kernels require.
FUSED_PAD = 8


@dataclass
class SMoPEHparams(Hparams):
    """Defaults are the CIFAR-100 configuration of the official code; see `SMoPE.DEFAULTS`."""
    epochs: int = 20  # E sparse epochs per task (task 0 first adds int(E/2) dense ones)
    batch_size: int = 128
    lr: float = 0.005  # head lr; the prompt experts train at prompt_lr_mult * lr
    optimizer: str = "adamw"
    prompt_lr_mult: float = 5.0  # "HiDe-Prompt larger prompt lr" in the code
    # -- experts
    # prompted blocks; None = first half (0-5 of ViT-B/16)
    layers: list[int] | None = hparam(None, ge=0)
    num_experts: int = hparam(25, ge=1)  # N_p per head per layer
    top_k: int = hparam(5, ge=1, le="num_experts")  # K experts kept per image, layer and head
    # -- components (the ablation switches)
    aggregate: bool = True  # score aggregation; False = per-token scores (plain prefix attention)
    sparse: bool = True  # top-K expert selection; False = every expert at every step
    noise: bool = True  # adaptive noise on frequently used experts (selection, training only)
    eps: float = hparam(0.4, ge=0)  # noise strength, also the router loss margin (code: one eps)
    # "code": mean over experts with F > 0 | "paper": over all N_p
    noise_threshold: str = hparam("code", choices=("code", "paper"))
    exclude_unused: bool = False  # test routing: True = the code's F = 0 exclusion (see SMoPE)
    # routing of the per-task counting pass: "suite" = plain top-K unless `exclude_unused`;
    # "official" = the code's, which always leaves out the experts never used so far (see SMoPE).
    # Added after the fmnist-5t records were published: left out of the run key at its default.
    count_rule: str = added_hparam("suite", choices=("suite", "official"))
    dense_warmup: bool = True  # task 0: int(E/2) epochs with every expert before sparse training
    router_loss: bool = True
    alpha_router: float = hparam(1e-5, ge=0)
    proto_loss: bool = True
    alpha_proto: float = hparam(1e-5, ge=0)
    alignment: bool = True  # classifier alignment after every task >= 1
    # -- classifier alignment (code: crct_epochs, ca_batch_size_ratio, ca_lr / 10, ca_weight_decay)
    ca_epochs: int = hparam(50, ge=0)
    ca_batch_ratio: int = hparam(1, ge=1)  # samples per class per epoch = minibatch = batch * ratio
    # the code's effective rate, ca_lr / 10, cosine to ca_min_lr per iteration
    ca_lr: float = hparam(1e-5, gt=0)
    ca_min_lr: float = hparam(1e-6, ge=0, le="ca_lr")
    ca_weight_decay: float = hparam(5e-4, ge=0)
    # -- implementation
    # "fused": F.scaled_dot_product_attention | "reference": explicit
    attn_impl: str = hparam("fused", choices=("fused", "reference"))


class Routing(NamedTuple):
    """What one prompted layer decided in the last forward."""
    scores: Tensor  # (B, H, R, E) raw routing scores q.k_j (float32, with grad); R = 1 per image
    selected: Tensor | None  # (B, H, R, K) kept experts; None = all (dense)


class SMoPEModel(PromptModel):
    """The frozen ViT, the expert keys/values of the prompted layers, the routing state, a head.

    Parameters: `key`, `value` (L, H, E, hd), uniform [0, 1) as the code. Buffers (saved with the
    model, unlike the reference code): `counts` (L, H, E) activation counts F, `frequent` the
    sticky flags, `old_key` the snapshot of the keys taken at the start of the current task.
    """

    def __init__(self, vit: PromptedViT, num_classes: int, hp: SMoPEHparams):
        super().__init__(vit, num_classes)
        self.hp = hp
        self.layers = list(hp.layers) if hp.layers is not None else list(range(vit.depth // 2))
        if not self.layers or any(not 0 <= i < vit.depth for i in self.layers):
            raise ValueError(f"layers must be a non-empty subset of 0..{vit.depth - 1}, got {hp.layers}")
        shape = (len(self.layers), vit.num_heads, hp.num_experts, vit.head_dim)
        self.key = nn.Parameter(torch.rand(shape))
        self.value = nn.Parameter(torch.rand(shape))
        self.register_buffer("counts", torch.zeros(shape[:3], dtype=torch.long))
        self.register_buffer("frequent", torch.zeros(shape[:3], dtype=torch.bool))
        self.register_buffer("old_key", self.key.detach().clone())
        self.dense = False  # set by the strategy during the task-0 warm-up
        self.counting = False  # set by the strategy during its per-task counting pass
        self.routing: list[Routing] = []  # per prompted layer, from the last forward
        self.record_attention = False  # reference path only: keep the expert attention weights
        self.attention_weights: dict[int, Tensor] = {}  # layer -> (B, H, N, E)

    # ------------------------------------------------------------------ forward
    def features(self, x: Tensor) -> Tensor:
        self.routing = []
        attention = {layer: self._attention_fn(i) for i, layer in enumerate(self.layers)}
        return self.vit(x, attention=attention)

    def _attention_fn(self, i: int):
        return lambda q, k, v: self.expert_attention(i, q, k, v)

    def expert_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Attention of prompted layer `i` with its experts; q, k, v are (B, H, N, hd)."""
        hp = self.hp
        key = self.key[i]  # (H, E, hd)
        rows = q.mean(dim=2, keepdim=True) if hp.aggregate else q  # (B, H, R, hd)
        # Routing score: raw dot product (no 1/sqrt(hd): the router loss sees it unscaled), in
        # float32 so that autocast never flips a top-K decision.
        scores = rows.float() @ key.float().transpose(-1, -2)  # (B, H, R, E)
        selected = self.select(i, scores)
        self.routing.append(Routing(scores, selected))
        if hp.attn_impl == "reference":
            return self._reference_attention(i, q, k, v, scores, selected)
        return self._fused_attention(i, q, k, v, scores, selected)

    def select(self, i: int, scores: Tensor) -> Tensor | None:
        """Top-K experts per row (image, or token when not aggregating), layer and head, after the
        penalty c_j * (max s - min s) (docs/sources.md#smope-adaptive-noise): c = eps on flagged
        experts while training
        (adaptive noise), c = 2 on never-used experts at test if `exclude_unused`. None = dense."""
        if self.dense or not self.hp.sparse:
            return None
        s = scores.detach()
        coef = self.penalty(i)
        if coef is not None:
            spread = s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)  # per image and head
            s = s - coef[None, :, None, :] * spread
        return s.topk(self.hp.top_k, dim=-1).indices

    def penalty(self, i: int) -> Tensor | None:
        """(H, E) selection penalty coefficients of layer `i` in the current mode, or None: the
        adaptive noise while training; at evaluation the never-used experts' penalty under
        `exclude_unused`, and in the counting pass under `count_rule="official"`."""
        hp = self.hp
        if self.training:
            if hp.noise and hp.eps != 0:
                return hp.eps * self.frequent[i].float()
            return None
        if hp.exclude_unused or (self.counting and hp.count_rule == "official"):
            return UNUSED_PENALTY * (self.counts[i] == 0).float()
        return None

    def _reference_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, scores: Tensor,
                             selected: Tensor | None) -> Tensor:
        """docs/sources.md#smope-routing-and-attention literally: [tau*s_j for kept experts,
        row-expanded] ++ [tau*q_i.k_n], one
        softmax, unselected experts dropped (logit -inf, so their weight is exactly 0)."""
        b, h, n, hd = q.shape
        tau = hd ** -0.5
        expert_logits = tau * scores
        if selected is not None:
            kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, selected, True)
            expert_logits = expert_logits.masked_fill(~kept, float("-inf"))
        logits = torch.cat([expert_logits.to(q.dtype).expand(b, h, n, -1),
                            tau * (q @ k.transpose(-1, -2))], dim=-1)
        attn = logits.softmax(dim=-1)
        e = scores.shape[-1]
        if self.record_attention:
            self.attention_weights[self.layers[i]] = attn[..., :e].detach()
        return attn[..., :e] @ self.value[i].to(q.dtype) + attn[..., e:] @ v

    def _fused_attention(self, i: int, q: Tensor, k: Tensor, v: Tensor, scores: Tensor,
                         selected: Tensor | None) -> Tensor:
        """The same attention through `F.scaled_dot_product_attention`, exactly.

        Aggregated scores: the row-expanded expert logit rides on one extra coordinate,
        q'_i = [q_i, 1, 0..] and k'_j = [0, s_j, 0..], so q'_i.k'_j = s_j for every token i while
        token keys get a 0 there; only the K kept experts are gathered, so nothing is masked.
        Per-token scores: ordinary prefix attention over the expert keys, with a -inf mask on the
        experts a token did not select.
        """
        b, h, n, hd = q.shape
        value = self.value[i].to(q.dtype).unsqueeze(0).expand(b, -1, -1, -1)  # (B, H, E, hd)
        if not self.hp.aggregate:
            key = self.key[i].to(q.dtype).unsqueeze(0).expand(b, -1, -1, -1)
            mask = None
            if selected is not None:
                dropped = torch.ones_like(scores, dtype=torch.bool).scatter_(-1, selected, False)
                mask = torch.zeros(b, h, n, scores.shape[-1] + n, dtype=q.dtype, device=q.device)
                mask[..., :scores.shape[-1]].masked_fill_(dropped, float("-inf"))
            return F.scaled_dot_product_attention(q, torch.cat([key, k], 2),
                                                  torch.cat([value, v], 2), attn_mask=mask)
        if selected is not None:
            scores = scores.gather(-1, selected)  # (B, H, 1, K)
            value = value.gather(2, selected.transpose(-1, -2).expand(-1, -1, -1, hd))
        m = scores.shape[-1]
        zeros = q.new_zeros
        q_aug = torch.cat([q, q.new_ones(b, h, n, 1), zeros(b, h, n, FUSED_PAD - 1)], -1)
        k_exp = torch.cat([zeros(b, h, m, hd), scores.transpose(-1, -2).to(q.dtype),
                           zeros(b, h, m, FUSED_PAD - 1)], -1)
        k_aug = torch.cat([k_exp, F.pad(k, (0, FUSED_PAD))], 2)
        v_aug = F.pad(torch.cat([value, v], 2), (0, FUSED_PAD))
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=hd ** -0.5)
        return out[..., :hd]

    # ------------------------------------------------------------------ losses
    def router_loss(self) -> Tensor:
        """docs/sources.md#smope-router-loss (code form): for every prompted layer, head and kept
        expert t, the batch-mean
        CE(z, t) with z_j = s_j + eps * (max s - min s) * [j not kept] on raw scores; summed."""
        total = self.key.new_zeros(())
        for r in self.routing:
            if r.selected is None:
                continue
            s = r.scores
            spread = (s.amax(-1, keepdim=True) - s.amin(-1, keepdim=True)).detach()
            not_kept = torch.ones_like(s, dtype=torch.bool).scatter_(-1, r.selected, False)
            z = s + self.hp.eps * spread * not_kept
            nll = -z.log_softmax(-1).gather(-1, r.selected)  # (B, H, R, K)
            total = total + nll.mean(dim=(0, 2)).sum()
        return total

    def prototype_routing(self) -> tuple[Tensor, Tensor, Tensor]:
        """docs/sources.md#smope-prototype-loss: every old key as a pseudo-query p. Returns its
        logits p.k_j under the current
        keys (L, H, E, E), its top-K targets under the old keys (L, H, E, K), and which p count as
        prototypes (the frequently used experts, (L, H, E))."""
        old = self.old_key
        targets = (old @ old.transpose(-1, -2)).topk(self.hp.top_k, dim=-1).indices
        logits = old @ self.key.transpose(-1, -2)
        return logits, targets, self.frequent

    def proto_loss(self) -> Tensor:
        """Sum over layers and heads of the prototype-mean of sum_{t in K_p} CE(p.k, t)."""
        logits, targets, used = self.prototype_routing()
        nll = -logits.log_softmax(-1).gather(-1, targets).sum(-1)  # (L, H, E)
        used = used.float()
        return ((nll * used).sum(-1) / used.sum(-1).clamp(min=1)).sum()

    # ------------------------------------------------------------------ per-task state
    @torch.no_grad()
    def count_selection(self) -> None:
        """Add the last forward's raw top-K (no penalty, as the code) to the counts F."""
        for i, r in enumerate(self.routing):
            top = r.scores.topk(self.hp.top_k, dim=-1).indices  # (B, H, R, K)
            idx = top.transpose(0, 1).reshape(top.shape[1], -1)  # (H, B*R*K)
            self.counts[i].scatter_add_(1, idx, torch.ones_like(idx))

    @torch.no_grad()
    def start_task(self) -> None:
        """Start of a task >= 1: snapshot the keys and flag the frequently used experts."""
        self.old_key.copy_(self.key)
        f = self.counts.float()
        total = f.sum(-1, keepdim=True)
        if self.hp.noise_threshold == "code":
            mean = total / (f > 0).sum(-1, keepdim=True).clamp(min=1)
        else:
            mean = total / f.shape[-1]
        # Flags are sticky. A head that never counted anything flags nothing (the code would flag
        # all experts there, but its counting pass always runs).
        self.frequent |= (f >= mean) & (total > 0)


def _ladder() -> list[tuple[str, dict]]:
    """The paper's cumulative ablation (docs/sources.md#smope-secondary-notes, CUB-200) as (label,
    hparam overrides), from
    plain one-prompt prefix tuning (per-token scores, every expert, no extra stage) to the full
    method: each rung adds one component; a rung's overrides switch off all later ones."""
    rungs = [("one prompt", None), ("+ score aggregation", "aggregate"),
             ("+ sparse expert selection", "sparse"), ("+ adaptive noise", "noise"),
             ("+ task-adaptive prediction", "alignment"), ("+ initial dense training", "dense_warmup"),
             ("+ router loss", "router_loss"), ("+ prototype loss (SMoPE)", "proto_loss")]
    switches = [s for _, s in rungs if s is not None]
    return [(label, {s: False for s in switches[i:]}) for i, (label, _) in enumerate(rungs)]


@register("smope")
class SMoPE(PromptStrategy):
    """SMoPE on the suite's shared frozen ViT (mechanism in the module docstring).

    Switches and named choices:
    - `exclude_unused` (test-time routing). The code's evaluation rule gives never-selected
      experts (F = 0) a penalty of 2 * range, i.e. excludes them (models/zoo.py:170-171). The
      reference code keeps F in Python attributes that no checkpoint stores, and its reported
      metrics come from a fresh model reloaded per task, where every F = 0 and the rule is a no-op
      at test; the rule acts on its printed in-training evaluation and on its per-task counting
      pass (below), where F is in memory. Default False = the test-time behaviour behind the
      published numbers; True = the rule as written. The suite registers F, the flags and the
      old-key snapshot as buffers, so they survive save/load (the reference code loses them).
    - `count_rule` (routing of the per-task counting pass). The code counts with an evaluation
      forward (learners/prompt.py:408-419), so that rule always applies there: batch by batch,
      the experts whose count is still 0 (over earlier tasks and the pass's earlier batches) get
      the 2 * range penalty in every layer's selection, which changes the later layers' inputs
      and so some of their raw top-K counts. Default "suite": the counting pass routes with plain
      top-K unless `exclude_unused` (a departure, kept because the published records were made
      with it); "official": the code's rule, in a counting pass of its own before the statistics
      pass (`--set smope.count_rule=official` gives its own labelled row).
    - `noise_threshold`: "code" flags F >= sum F / #(F > 0) (default); "paper" (poster) flags
      F >= sum F / N_p.
    - `attn_impl`: "fused" (SDPA, default) or "reference" (explicit softmax); equal to 1e-5.
    - `aggregate=False` is the code's non-aggregated path: every token scores the experts with its
      own query (ordinary prefix attention); with `sparse` it also selects its own top-K.

    Departures from the paper / official code:
    - One ViT pass, as the code; the backbone is frozen with requires_grad_(False) (the code only
      leaves it out of the optimizer, so autograd computes its weight gradients for nothing).
    - Schedule: the suite's per-iteration cosine to 0 for every protocol. The code's `coswm` runs
      its first `schedule[0]` iterations at 1e-6 (its first step at the full lr), decays to 1e-6,
      and CUB uses a per-epoch cosine; none of these is reproduced.
    - The counting pass sees every training image of the task once (training transform, as the
      code); the code reuses its shuffled training loader, so `drop_last` can skip a few. It
      counts each image's raw top-K, as the code (models/zoo.py:215-228); under the default
      `count_rule="suite"` its forward routes without the code's never-used rule (see above).
    - A head whose counts are all zero flags nothing at the next task (the code would flag every
      expert; it cannot happen in the code, whose counting pass always runs).
    - Classifier alignment: AdamW at ca_lr = 1e-5 (the code's ca_lr / 10) with a per-iteration
      cosine to 1e-6. The code's scheduler (utils/schedulers.py:95-97) sets the optimizer's own
      rate (1e-4, trainer.py:519-525) for the first step and then resets `last_iter` to -1 after
      its own `step(0)`, so its step i >= 1 runs at the rate scheduled for step i - 1: one step
      behind the schedule for the whole stage. Neither the 10x first step nor the lag is
      reproduced.
    - The router loss keeps the code's form (log-softmax CE on unscaled scores with an eps * range
      margin), not the poster's ratio without log or margin; eps sets the margin even when
      `noise=False`. Prototype targets use the old keys, as the code.
    - Routing scores are computed in float32 under autocast (the code has no autocast).
    - Labels are not remapped to order of appearance: the head is indexed by class id and masked
      to the current task (training) or the seen classes (evaluation), which is equivalent.
    - fmnist-5t (tiny ViT, 4 heads of 16 dims, 6 blocks -> layers 0-2): the CIFAR-100 values
      (lr 0.005, eps 0.4, AdamW, 5x prompt lr) except: 10 experts per head and K = 2 (the paper's
      K/N_p = 1/5, on a 50-token sequence); alpha_router = alpha_proto = 1.5e-4, which keeps the
      CIFAR setting's effective loss weight (#layers * #heads * K * alpha ~ 3.6e-3); 2 epochs at
      batch 32 (task 0: 1 dense warm-up epoch first); alignment for 10 epochs at lr 1e-3 -> 1e-5,
      since 1e-5 over a few dozen steps leaves the head where it was (1e-3 against 1e-5 on seeds
      0-1; docs/tuning.md).
    """

    description = ("sparse mixture of prompt experts: one shared prefix prompt, per-head top-K "
                   "experts routed by aggregated prompt-attention scores, one ViT pass")
    Hparams = SMoPEHparams
    passes_train = 1
    passes_test = 1
    ABLATION = _ladder()  # `run_suite.py --ablation smope` (protocol YAML: `variants: ladder`)
    DEFAULTS = {
        # docs/sources.md#smope-per-dataset-settings (configs/*.yaml, experiments/*.sh of the code)
        "cifar100-10t": dict(epochs=20, batch_size=128, lr=0.005, alpha_router=1e-5,
                             alpha_proto=1e-5, eps=0.4, ca_epochs=50, ca_batch_ratio=1),
        "imagenet-r-5t": dict(epochs=20, batch_size=64, lr=0.0025, alpha_router=1e-4,
                              alpha_proto=1e-5, eps=0.7, ca_epochs=60, ca_batch_ratio=2),
        "imagenet-r-10t": dict(epochs=20, batch_size=64, lr=0.0025, alpha_router=5e-5,
                               alpha_proto=1e-4, eps=0.5, ca_epochs=50, ca_batch_ratio=6),
        "imagenet-r-20t": dict(epochs=20, batch_size=64, lr=0.0025, alpha_router=1e-4,
                               alpha_proto=5e-5, eps=0.3, ca_epochs=50, ca_batch_ratio=4),
        "cub200-10t": dict(epochs=20, batch_size=128, lr=0.005, alpha_router=1e-5,
                           alpha_proto=5e-5, eps=0.4, ca_epochs=50, ca_batch_ratio=1),
        # the cheap embedded default (see the class docstring)
        "fmnist-5t": dict(epochs=2, batch_size=32, lr=0.005, num_experts=10, top_k=2,
                          alpha_router=1.5e-4, alpha_proto=1.5e-4, eps=0.4, ca_epochs=10,
                          ca_batch_ratio=1, ca_lr=1e-3, ca_min_lr=1e-5),
    }

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Seeded from the run's torch seed, so the alignment samples are reproducible; per epoch
        # batch * ratio samples per class, also the minibatch
        self.seed = torch.initial_seed() % (2 ** 31)
        hp, n = self.hp, self.hp.batch_size * self.hp.ca_batch_ratio
        self.alignment = AlignmentStage(
            AlignmentConfig(epochs=hp.ca_epochs, samples_per_class=n, batch_size=n, lr=hp.ca_lr,
                            optimizer="adamw", weight_decay=hp.ca_weight_decay, schedule="cosine",
                            min_lr=hp.ca_min_lr),
            seed=self.seed, generator=torch.Generator().manual_seed(self.seed))

    def build_model(self, vit: PromptedViT, num_classes: int) -> SMoPEModel:
        return SMoPEModel(vit, num_classes, self.hp)

    # ------------------------------------------------------------------ per-task schedule
    def task_start(self) -> None:
        if self.task_id >= 1:
            self.model.start_task()

    def _train_exp(self, experience, eval_streams=None, **kwargs):
        """Task 0 first trains int(E/2) dense epochs, then a fresh optimizer and schedule run the
        E sparse epochs (docs/sources.md#smope-training-schedule); later tasks are sparse only."""
        epochs = self.hp.epochs
        warmup = int(0.5 * epochs) if (self.task_id == 0 and self.hp.dense_warmup) else 0
        if warmup > 0:
            self.model.dense = True
            self.train_epochs = warmup
            try:
                super()._train_exp(experience, eval_streams, **kwargs)
            finally:
                self.model.dense = False
            self.make_optimizer()
            self.clock.train_exp_iterations = 0  # the cosine restarts with the new optimizer
        self.train_epochs = epochs
        super()._train_exp(experience, eval_streams, **kwargs)

    @classmethod
    def task_stages(cls, hp: SMoPEHparams, task: int) -> TaskStages:
        """Task 0's int(E/2) dense epochs, and the one or two no-grad passes of `task_end`."""
        count = (hp.sparse and (hp.noise or hp.exclude_unused)) or hp.proto_loss
        passes = int(hp.alignment) + int(count and cls.separate_count(hp))
        warmup = int(0.5 * hp.epochs) if task == 0 and hp.dense_warmup else 0
        return TaskStages(extra_epochs=warmup, no_grad_passes=passes)

    def aux_loss(self) -> Tensor | None:
        hp, m = self.hp, self.model
        loss = None
        if hp.router_loss and hp.alpha_router > 0 and any(r.selected is not None for r in m.routing):
            loss = hp.alpha_router * m.router_loss()
        if hp.proto_loss and hp.alpha_proto > 0 and self.task_id >= 1:
            proto = hp.alpha_proto * m.proto_loss()
            loss = proto if loss is None else loss + proto
        return loss

    def task_end(self) -> None:
        """Counting pass, class statistics and classifier alignment
        (docs/sources.md#smope-training-schedule).

        The code runs the counting pass and the statistics pass one after the other, both no-grad
        passes over the task's training images. Its counting forward always routes with the
        never-used rule, since its counts are in memory (`count_rule="official"`); the suite's
        default counting routes as the statistics pass does, which reads the counts only under
        `exclude_unused`. When neither reads the counts, one shared pass gives the same counts and
        features, and the suite runs one; otherwise the counting pass runs first, on its own."""
        hp = self.hp
        count = (hp.sparse and (hp.noise or hp.exclude_unused)) or hp.proto_loss
        if count and self.separate_count(hp):
            self.training_pass(count=True)
            count = False
        if hp.alignment:
            self.align(*self.training_pass(count=count))

    @staticmethod
    def separate_count(hp: SMoPEHparams) -> bool:
        """Whether the counting pass runs on its own rather than inside the statistics pass: no
        statistics pass, or a routing that reads the counts as they grow."""
        return not hp.alignment or hp.exclude_unused or hp.count_rule == "official"

    @torch.no_grad()
    def training_pass(self, count: bool) -> tuple[Tensor, Tensor]:
        """One no-grad pass over the task's training images (training transform, as the code):
        returns the head's input features and labels; with `count`, adds every image's raw top-K
        per layer and head to the counts F, batch by batch (the forward routes with the
        evaluation rule, plus the never-used rule under `count_rule="official"`)."""
        self.model.eval()
        self.model.counting = count

        def features(x: Tensor) -> Tensor:
            f = self.model.features(x)
            if count:
                self.model.count_selection()
            return f
        batches = self.loader(self.experience.dataset, train_transform=True,
                              batch_size=self.hp.batch_size)
        try:
            return collect_features(features, batches)
        finally:
            self.model.counting = False

    def align(self, features: Tensor, labels: Tensor) -> None:
        """Statistics of the current classes (prompted final-LN [CLS] of training images, one
        diagonal Gaussian per class, as the code), then for tasks >= 1 the head re-fit on samples
        of every seen class: per epoch batch * ratio samples per class and #old-classes steps."""
        self.alignment.after_task(self.model.head, features, labels, self.seen_classes,
                                  self.current_classes, device=self.device)
        self.model.eval()
