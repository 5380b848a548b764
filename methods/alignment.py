"""Gaussian class statistics and classifier re-fit, shared by HiDe-Prompt, VQ-Prompt and SMoPE.

Why: a head trained task after task with masked CE is biased toward the newest classes. HiDe's
"task-adaptive prediction", VQ-Prompt's "representation statistics" and SMoPE's classifier
alignment all fix this the same way, without storing images: keep a Gaussian (or a few, one per
k-means centroid) per class of the head's input feature, and after each task re-fit the head alone
on samples drawn from the statistics of every seen class, with CE over the seen classes.

- `ClassStatistics`: per class, `n_centroids` Gaussians (k-means in torch, seeded) with a diagonal
  or full covariance, plus `eps * I` at sampling time (1e-4 in the HiDe / VQ / SMoPE code).
- `collect_features`: a no-grad pass that returns features and labels (CPU, float32).
- `align_classifier`: the re-fit loop. Each epoch draws `samples_per_class` fresh samples per seen
  class, shuffles them and runs `iters_per_epoch` minibatches (the reference code runs "number of
  old classes" iterations, i.e. a random subset of the drawn samples; `None` = one pass over them).
- `AlignmentStage`: the two together as the per-task stage a method holds, one per classifier it
  re-fits, set up with the method's own knobs (HiDe-Prompt: the TII model and the main head;
  VQ-Prompt and SMoPE: the head). After each task: statistics of the new classes, then, once there
  are old classes, the re-fit over every seen class with one iteration per old class and epoch.

Statistics live on the CPU (a CPU `torch.Generator` drives all randomness, so a run is
reproducible on any device); samples are moved to `device` batch by batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def kmeans(x: Tensor, k: int, *, generator: torch.Generator, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Seeded k-means++ then Lloyd iterations. Returns (centroids (k', D), assignment (N,)), with
    k' = min(k, N). Empty clusters are re-seeded on the point farthest from its centroid."""
    n = x.shape[0]
    k = min(k, n)
    if k == 1:
        return x.mean(0, keepdim=True), torch.zeros(n, dtype=torch.long)
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        idx = int(torch.multinomial(probs, 1, generator=generator))
        centroids.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    c = torch.stack(centroids)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        new_c = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        for j in torch.nonzero(counts == 0).flatten().tolist():
            far = int(((x - c[assign]) ** 2).sum(1).argmax())
            new_c[j], counts[j] = x[far], 1
            assign[far] = j
        c = new_c / counts.unsqueeze(1).to(x.dtype)
        new_assign = torch.cdist(x, c).argmin(1)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return c, assign


class ClassStatistics:
    """Per-class Gaussian statistics of the head's input feature (see the module docstring).

    covariance: "diag" (HiDe / VQ / SMoPE code) or "full"; n_centroids: Gaussians per class
    (HiDe 10, VQ and SMoPE 1 = plain moments); eps: added to the (co)variance when sampling;
    seed: of the k-means initialisation (per class). Variances are the biased (1/n) moments of
    each cluster, as the code's np.var. A one-point cluster keeps eps*I as its covariance (the
    HiDe code skips such clusters when sampling).
    """

    def __init__(self, covariance: str = "diag", n_centroids: int = 1, eps: float = 1e-4,
                 seed: int = 0):
        if covariance not in ("diag", "full"):
            raise ValueError(f"covariance must be 'diag' or 'full', got {covariance!r}")
        if n_centroids < 1:
            raise ValueError(f"n_centroids must be >= 1, got {n_centroids}")
        self.covariance = covariance
        self.n_centroids = n_centroids
        self.eps = eps
        self.seed = seed
        # class -> (means (k, D), variances (k, D) or covariances (k, D, D))
        self._stats: dict[int, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """(Re)compute the statistics of every class present in `labels` (others are kept)."""
        features = features.detach().float().cpu()
        labels = labels.detach().cpu()
        for c in sorted(set(labels.tolist())):
            x = features[labels == c]
            g = torch.Generator().manual_seed(self.seed * 100003 + int(c))
            centroids, assign = kmeans(x, self.n_centroids, generator=g)
            means, spreads = [], []
            for j in range(centroids.shape[0]):
                xj = x[assign == j]
                mu = xj.mean(0)
                xc = xj - mu
                denom = xj.shape[0]  # biased, as np.var in the HiDe / VQ / SMoPE code
                if self.covariance == "diag":
                    spreads.append((xc ** 2).sum(0) / denom)
                else:
                    spreads.append(xc.T @ xc / denom)
                means.append(mu)
            self._stats[int(c)] = (torch.stack(means), torch.stack(spreads))

    def classes(self) -> list[int]:
        return sorted(self._stats)

    def means(self, classes: Iterable[int] | None = None) -> Tensor:
        """All centroid means of `classes` (default: every class), stacked (sum of k', D): the
        class prototypes of HiDe's contrastive regulariser."""
        cs = self.classes() if classes is None else list(classes)
        if not cs:
            return torch.zeros(0, 0)
        return torch.cat([self._stats[c][0] for c in cs])

    @torch.no_grad()
    def sample(self, classes: list[int], n_per_class: int,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`n_per_class` samples per class from N(mean, cov + eps*I), split evenly over the class's
        centroids (as the HiDe code: the same count per centroid). CPU tensors (N, D), (N,)."""
        missing = [c for c in classes if c not in self._stats]
        if missing:
            raise KeyError(f"no statistics for classes {missing}; have {self.classes()}")
        xs, ys = [], []
        for c in classes:
            means, spreads = self._stats[c]
            k, d = means.shape
            counts = [n_per_class // k + (1 if j < n_per_class % k else 0) for j in range(k)]
            for j, n in enumerate(counts):
                if n == 0:
                    continue
                z = torch.randn(n, d, generator=generator)
                if self.covariance == "diag":
                    x = means[j] + z * (spreads[j] + self.eps).sqrt()
                else:
                    cov = spreads[j] + self.eps * torch.eye(d)
                    x = means[j] + z @ _cholesky(cov).T
                xs.append(x)
                ys.append(torch.full((n,), c, dtype=torch.long))
        return torch.cat(xs), torch.cat(ys)

    def state_dict(self) -> dict:
        state: dict = {"covariance": self.covariance, "n_centroids": self.n_centroids,
                       "eps": self.eps, "seed": self.seed}
        for c, (m, s) in self._stats.items():
            state[f"{c}.mean"] = m.clone()
            state[f"{c}.spread"] = s.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.covariance = state["covariance"]
        self.n_centroids = int(state["n_centroids"])
        self.eps = float(state["eps"])
        self.seed = int(state.get("seed", 0))
        self._stats = {}
        for key in state:
            if key.endswith(".mean"):
                c = key[: -len(".mean")]
                self._stats[int(c)] = (state[key].float().cpu(), state[f"{c}.spread"].float().cpu())


def _cholesky(cov: Tensor) -> Tensor:
    """Cholesky with growing jitter: sample covariances of few points are singular."""
    jitter = 0.0
    for _ in range(6):
        L, info = torch.linalg.cholesky_ex(cov + jitter * torch.eye(cov.shape[0]))
        if int(info) == 0:
            return L
        jitter = max(jitter * 10, 1e-6 * float(cov.diagonal().mean().clamp_min(1e-12)))
    raise RuntimeError("covariance is not positive definite even with jitter")


@dataclass
class AlignmentConfig:
    """The re-fit loop's hyperparameters (per-method defaults live in each method's Hparams)."""
    epochs: int = 10
    samples_per_class: int = 256
    batch_size: int = 256
    iters_per_epoch: int | None = None  # None = ceil(drawn samples / batch_size)
    lr: float = 0.005
    optimizer: str = "sgd"  # adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine (per iteration, lr -> min_lr) | constant
    min_lr: float = 0.0

    def __post_init__(self):
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"alignment optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"alignment schedule must be cosine or constant, got {self.schedule!r}")


@torch.no_grad()
def collect_features(feature_fn: Callable[[Tensor], Tensor],
                     batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Run `feature_fn` over (x, y) batches without grad; (features (N, D), labels (N,)) on CPU."""
    feats, labels = [], []
    for batch in batches:
        x, y = batch[0], batch[1]
        feats.append(feature_fn(x).detach().float().cpu())
        labels.append(torch.as_tensor(y).cpu())
    if not feats:
        raise ValueError("collect_features got no batches")
    return torch.cat(feats), torch.cat(labels)


def align_classifier(head: nn.Module, stats: ClassStatistics, classes: list[int],
                     cfg: AlignmentConfig, *, generator: torch.Generator,
                     device: str | torch.device = "cpu", logit_mask: Tensor | None = None) -> None:
    """Re-fit `head` (its trainable parameters only) on samples from the statistics of `classes`,
    with CE over those classes (`logit_mask`, a bool mask over the head's outputs, overrides it).
    `head` maps a feature (B, D) to logits over all classes indexed by class id."""
    params = [p for p in head.parameters() if p.requires_grad]
    if not params or not classes or cfg.epochs <= 0:
        return
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    n_drawn = cfg.samples_per_class * len(classes)
    iters = cfg.iters_per_epoch or math.ceil(n_drawn / cfg.batch_size)
    total = max(1, cfg.epochs * iters)
    was_training = head.training
    head.train()
    step = 0
    mask = None
    for _ in range(cfg.epochs):
        x_all, y_all = stats.sample(classes, cfg.samples_per_class, generator)
        perm = torch.randperm(x_all.shape[0], generator=generator)
        x_all, y_all = x_all[perm], y_all[perm]
        for i in range(iters):
            lo = (i * cfg.batch_size) % x_all.shape[0]
            x = x_all[lo: lo + cfg.batch_size].to(device)
            y = y_all[lo: lo + cfg.batch_size].to(device)
            if cfg.schedule == "cosine":
                lr = cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * step / total))
                for g in opt.param_groups:
                    g["lr"] = lr
            logits = head(x)
            if mask is None:
                if logit_mask is not None:
                    mask = logit_mask.to(device=logits.device, dtype=torch.bool)
                else:
                    mask = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                    mask[torch.as_tensor(classes, device=logits.device)] = True
            loss = F.cross_entropy(logits.masked_fill(~mask, float("-inf")), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    head.train(was_training)


class AlignmentStage:
    """Class statistics of one classifier's input and that classifier's re-fit on samples of them,
    as one component a method calls at the end of each task (`after_task`).

    `config`: the re-fit's hyperparameters (its `iters_per_epoch` is set per task: one iteration
    per old class, the HiDe / VQ / SMoPE code's loop); `covariance`, `n_centroids`, `eps`, `seed`:
    the `ClassStatistics`. `generator` drives the re-fit's sampling: a generator the method seeds
    once and keeps across tasks (SMoPE), or None for a fresh one per re-fit seeded from the global
    torch RNG at that moment (HiDe, VQ), so the run's seed decides it either way.
    """

    def __init__(self, config: AlignmentConfig, *, covariance: str = "diag", n_centroids: int = 1,
                 eps: float = 1e-4, seed: int = 0, generator: torch.Generator | None = None):
        self.config = config
        self.stats = ClassStatistics(covariance, n_centroids=n_centroids, eps=eps, seed=seed)
        self.generator = generator

    def after_task(self, classifier: nn.Module, features: Tensor, labels: Tensor,
                   seen_classes: Sequence[int], current_classes: Sequence[int], *,
                   device: str | torch.device = "cpu") -> bool:
        """Update the statistics with the task's `features` / `labels` (its training images), then,
        if `seen_classes` holds classes of earlier tasks, re-fit `classifier` on samples of every
        seen class. Returns whether it re-fitted."""
        self.stats.update(features, labels)
        current = set(current_classes)
        old = [c for c in seen_classes if c not in current]
        if not old:
            return False
        generator = self.generator
        if generator is None:
            generator = torch.Generator().manual_seed(int(torch.randint(2 ** 31 - 1, (1,))))
        align_classifier(classifier, self.stats, list(seen_classes),
                         replace(self.config, iters_per_epoch=len(old)), generator=generator,
                         device=device)
        return True
