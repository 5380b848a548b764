"""`PromptStrategy`: the Avalanche `SupervisedTemplate` every method in the suite subclasses.

What it fixes for every method alike (the fairness rules of DESIGN.md):
- the backbone is frozen (`requires_grad_(False)`) and never in an optimizer: the optimizer is
  rebuilt at each task over the parameters that require grad, through `param_groups()`;
- training CE sees only the current task's logits (the others are -inf); evaluation masks the
  classes not seen yet, so the argmax is over all classes seen so far (class-incremental, no task
  id); the choice is the CODA / VQ / SMoPE convention and applies to every method;
- one optimizer family and one per-iteration cosine schedule, configured by `Hparams`;
- per-task stages through two hooks, `task_start()` (before the optimizer is built: freeze or
  initialise prompts) and `task_end()` (after training: statistics, alignment, counters).

A method subclasses `PromptStrategy`, defines `Hparams` (a dataclass extending the base one),
`DEFAULTS` (per-protocol overrides of the hparams), `build_model()`, and the hooks it needs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .vit import PromptedViT


@dataclass
class Hparams:
    """Training hyperparameters shared by every method (each method extends this dataclass)."""
    epochs: int = 5
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"  # adam | adamw | sgd
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine (per iteration, to 0) | constant
    clip_grad: float = 0.0  # max grad norm; 0 = off
    # what the method adds (prompts, keys, ...) trains at lr * prompt_lr_mult, the head at lr;
    # 1.0 = one group (HiDe-Prompt, VQ-Prompt and SMoPE code run prompts at 5x)
    prompt_lr_mult: float = 1.0

    def __post_init__(self):
        if self.optimizer not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optimizer must be adam, adamw or sgd, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"schedule must be cosine or constant, got {self.schedule!r}")


class PromptModel(nn.Module):
    """The learner: the shared frozen `PromptedViT`, the method's parameters and a linear head.

    `features(x)` returns the head input; `forward(x)` the logits over all `num_classes` (the
    head is allocated for every class up front, as in the reference code). The strategy tells the
    model the current task through `task_id` before training each task.

    The head starts at zero, as in the official L2P / DualPrompt code (its ViT's `head` Dense has
    `kernel_init=zeros`). Why it matters for every method that trains the head sequentially: the
    masked CE gradients of a task's rows sum to zero (sum_c (p_c - y_c) = 0 over the task's
    classes), so the sum of those rows never moves from its initial value (exactly, under Adam too
    for two-class tasks). A random init (PyTorch's default, the CODA / VQ / SMoPE code) therefore
    leaves each task a random logit offset that no training corrects and that decides cross-task
    comparisons; from zero there is none. fmnist-5t, 5 seeds: head_only 68.9 -> 75.2 FAA, CODA
    68.5 -> 74.8, DualPrompt 67.6 -> 73.2; HiDe, VQ and SMoPE re-fit their heads and move < 0.5.
    One consequence: at the first step of a task nothing behind the head gets gradient (W = 0).
    """

    def __init__(self, vit: PromptedViT, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.task_id = 0

    def features(self, x: Tensor) -> Tensor:
        return self.vit(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def added_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """What the method adds to the ViT, the head excluded (the cost table's count)."""
        for name, p in self.named_parameters():
            if not name.startswith(("vit.", "head.")):
                yield name, p

    def method_state_dict(self) -> dict[str, Tensor]:
        """Everything but the frozen backbone: what a checkpoint of the method needs."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vit.")}

    def load_method_state_dict(self, state: dict[str, Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("vit.")]
        if missing or unexpected:
            raise RuntimeError(f"method state mismatch: missing {missing}, unexpected {unexpected}")


class TaskStages(NamedTuple):
    """Work a task adds to its `epochs` training epochs, per training image of the task (what a
    cost estimate needs to know of a method's per-task stages)."""
    extra_epochs: float = 0.0  # more epochs of the training step (SMoPE's task-0 dense warm-up)
    no_grad_passes: float = 0.0  # no-grad ViT passes: statistics, counting, HiDe's TII stage


def quiet_evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


class PromptStrategy(SupervisedTemplate):
    """Base strategy of the suite (see the module docstring)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Hparams: ClassVar[type] = Hparams
    DEFAULTS: ClassVar[dict[str, dict[str, Any]]] = {}  # protocol name -> hparam overrides
    passes_train: ClassVar[int] = 1  # ViT forward passes per training image
    passes_test: ClassVar[int] = 1  # ViT forward passes per test image (the query pass counts)
    trains_jointly: ClassVar[bool] = False  # True: trained once on the whole stream (`joint`)

    def __init__(self, *, vit: PromptedViT, num_classes: int, hparams: Any = None,
                 device: str | torch.device = "cpu", eval_mb_size: int = 256,
                 evaluator: EvaluationPlugin | None = None, plugins: list | None = None,
                 precision: str = "fp32"):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        self.precision = precision
        if isinstance(hparams, self.Hparams):
            hp = hparams
        else:
            hp = self.Hparams(**(hparams or {}))
        self.hp = hp
        self.num_classes = num_classes
        self.task_id = -1
        self.current_classes: list[int] = []
        self.seen_classes: list[int] = []
        model = self.build_model(vit, num_classes)
        model.vit.requires_grad_(False)
        super().__init__(
            model=model, optimizer=self._new_optimizer(model), criterion=nn.CrossEntropyLoss(),
            train_mb_size=hp.batch_size, train_epochs=hp.epochs, eval_mb_size=eval_mb_size,
            device=device, plugins=plugins,
            evaluator=evaluator if evaluator is not None else quiet_evaluator(), eval_every=-1)
        self._base_lrs: list[float] = []
        self._total_iters = 1

    # ------------------------------------------------------------------ what a method defines
    def build_model(self, vit: PromptedViT, num_classes: int) -> PromptModel:
        return PromptModel(vit, num_classes)

    def param_groups(self) -> list[dict]:
        """Optimizer parameter groups over what requires grad: one group at `lr`, or, with
        `prompt_lr_mult != 1`, the method's own parameters at lr * prompt_lr_mult and the head at
        lr. Methods with other splits override this."""
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if self.hp.prompt_lr_mult == 1.0:
            return [{"params": trainable}]
        head = {id(p) for p in self.model.head.parameters()}
        return [{"params": [p for p in trainable if id(p) not in head],
                 "lr": self.hp.lr * self.hp.prompt_lr_mult},
                {"params": [p for p in trainable if id(p) in head], "lr": self.hp.lr}]

    def task_start(self) -> None:
        """Per-task set-up before the optimizer is built (freeze, initialise, snapshot)."""

    def task_end(self) -> None:
        """Per-task stage after the task's epochs (statistics, alignment, counters)."""

    def aux_loss(self) -> Tensor | None:
        """Extra training loss for the current minibatch (key pull, orthogonality, ...)."""
        return None

    @classmethod
    def task_stages(cls, hp: Any, task: int) -> TaskStages:
        """The ViT work of task `task`'s stages beyond its epochs (`hp`: an `Hparams`); none here."""
        return TaskStages()

    # ------------------------------------------------------------------ optimizer and schedule
    def _new_optimizer(self, model: nn.Module | None = None, groups: list[dict] | None = None):
        hp = self.hp
        if groups is None:
            model = model if model is not None else self.model
            groups = [{"params": [p for p in model.parameters() if p.requires_grad]}]
        groups = [g for g in groups if len(list(g["params"])) > 0]
        if not groups:  # nothing to train (never happens for a real method); keep Adam happy
            groups = [{"params": [nn.Parameter(torch.zeros(1))]}]
        if hp.optimizer == "adam":
            return torch.optim.Adam(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum,
                               weight_decay=hp.weight_decay)

    def make_optimizer(self, **kwargs):
        """Rebuilt at every task over the trainable parameters only (never the backbone)."""
        groups = self.param_groups()
        backbone = {id(p) for p in self.model.vit.parameters()}
        for g in groups:
            if any(id(p) in backbone for p in g["params"]):
                raise RuntimeError(f"{type(self).__name__}.param_groups() contains backbone weights")
        self.optimizer = self._new_optimizer(groups=groups)
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]

    def check_model_and_optimizer(self, **kwargs):
        self.model = self.model_adaptation()
        self.task_start()
        self.make_optimizer()

    def _before_training_epoch(self, **kwargs):
        self._total_iters = max(1, self.train_epochs * len(self.dataloader))
        super()._before_training_epoch(**kwargs)

    def _before_training_iteration(self, **kwargs):
        if self.hp.schedule == "cosine":
            it = self.clock.train_exp_iterations
            factor = 0.5 * (1.0 + math.cos(math.pi * min(it, self._total_iters) / self._total_iters))
            for g, base in zip(self.optimizer.param_groups, self._base_lrs):
                g["lr"] = base * factor
        super()._before_training_iteration(**kwargs)

    def optimizer_step(self):
        if self.hp.clip_grad > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.hp.clip_grad)
        self.optimizer.step()

    # ------------------------------------------------------------------ precision
    def autocast(self):
        """bf16 autocast of the minibatch forward only (opt-in, for GPUs). Statistics, alignment,
        counting and every other per-task stage stay fp32, as do parameters and optimizer state:
        a blanket autocast over whole tasks, tried on an H100, ruined the Gaussian class
        statistics (SMoPE seed 0 FAA 78.8 -> 50.7). Off (fp32) by default."""
        return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16,
                              enabled=self.precision == "bf16")

    # ------------------------------------------------------------------ task bookkeeping
    def _before_training_exp(self, **kwargs):
        exp = self.experience
        self.task_id = exp.current_experience
        self.current_classes = sorted(int(c) for c in exp.classes_in_this_experience)
        self.seen_classes = sorted(set(self.seen_classes) | set(self.current_classes))
        self.model.task_id = self.task_id
        super()._before_training_exp(**kwargs)

    def _after_training_exp(self, **kwargs):
        self.model.eval()
        self.task_end()
        super()._after_training_exp(**kwargs)

    # ------------------------------------------------------------------ forward and loss
    def class_mask(self, training: bool) -> Tensor:
        """Boolean mask over the head's outputs: current task (training) or seen classes (eval)."""
        allowed = self.current_classes if training else self.seen_classes
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)
        if allowed:
            mask[torch.as_tensor(allowed, device=self.device)] = True
        else:
            mask[:] = True
        return mask

    def mask_logits(self, logits: Tensor, training: bool) -> Tensor:
        return logits.masked_fill(~self.class_mask(training), float("-inf"))

    def forward(self):
        with self.autocast():
            logits = self.model(self.mb_x)
        return self.mask_logits(logits.float(), self.is_training)

    def criterion(self):
        loss = self._criterion(self.mb_output, self.mb_y)
        if self.is_training:
            extra = self.aux_loss()
            if extra is not None:
                loss = loss + extra
        return loss

    # ------------------------------------------------------------------ cost measurement
    def cost_forward(self, x: Tensor, training: bool) -> Tensor:
        """One forward of `x` as a training (`training=True`) or evaluation step runs it, for the
        cost table's FLOP count (`protocols.cost`). A strategy that has not trained yet is put in its
        first task (task 0, every class current) so task-dependent forwards work; a method whose
        forward needs more set-up overrides this."""
        if self.task_id < 0:
            self.task_id = self.model.task_id = 0
            self.current_classes = list(range(self.num_classes))
            self.seen_classes = list(range(self.num_classes))
        self.model.train(training)
        return self.model(x)

    # ------------------------------------------------------------------ helpers for stages
    def loader(self, dataset, *, train_transform: bool = False, batch_size: int | None = None,
               shuffle: bool = False, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate (x, y) on the device over an Avalanche dataset, with its train or eval
        transforms (statistics passes, frequency counting)."""
        ds = dataset.train() if train_transform else dataset.eval()
        dl = DataLoader(ds, batch_size=batch_size or self.eval_mb_size, shuffle=shuffle,
                        drop_last=drop_last, num_workers=0)
        for batch in dl:
            yield batch[0].to(self.device), batch[1].to(self.device)

    def hparams_dict(self) -> dict[str, Any]:
        return asdict(self.hp)

    @classmethod
    def hparam_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Hparams)]
