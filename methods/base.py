"""`PromptStrategy`: the Avalanche `SupervisedTemplate` every method in the suite subclasses.

What it fixes for every method alike (the suite's fairness rules):
- the backbone is frozen (`requires_grad_(False)`) and never in an optimizer: the optimizer is
  rebuilt at each task over the parameters that require grad, through `param_groups()`;
- training CE sees only the current task's logits (the others are -inf); evaluation masks the
  classes not seen yet, so the argmax is over all classes seen so far (class-incremental, no task
  id); the choice is the CODA / VQ / SMoPE convention and applies to every method;
- one optimizer family and one per-iteration cosine schedule, configured by `Hparams`;
- per-task stages through two hooks, `task_start()` (before the optimizer is built: freeze or
  initialise prompts) and `task_end()` (after training: statistics, alignment, counters);
- one data pipeline: every DataLoader (training, evaluation, the stages' `loader()`) comes from
  `methods.loading.make_loader`, with `loader_workers` processes, pinned memory and non-blocking
  copies on CUDA, persistent workers across a task's epochs, and batches that do not depend on
  the worker count.

A method subclasses `PromptStrategy`, defines `Hparams` (a dataclass extending the base one),
`DEFAULTS` (per-protocol overrides of the hparams), `build_model()`, and the hooks it needs.

Reference modes. Evaluation is per sample and independent of the test batch size. Where a
method's public code does something at test time that depends on the batch (a majority vote of
the prompt choice, a prefix reshape that mixes images), the method lists it in `REFERENCE_MODES`
and implements it behind `PromptModel.in_reference_mode(name)`; `strategy.reference_mode(*names)`
switches such modes on for an evaluation of the same trained model, and `REFERENCE_TESTS` says
which modes and which test batch size each protocol's reference configuration uses. A mode never
changes training and is never on by default; where the behaviour is also in the reference code's
training forward, the method has a hyperparameter for it (an `added_hparam`, off by default).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, Iterator, NamedTuple

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn
from .loading import default_loader_workers, make_loader
from .vit import PromptedViT


#: metadata flag of a hyperparameter added after records were published (see `added_hparam`)
KEYLESS_DEFAULT = "keyless_default"
#: metadata key of a hyperparameter's allowed values (see `hparam`)
LIMITS = "limits"


@dataclass(frozen=True)
class Limits:
    """The values a hyperparameter may take. A bound is a number or the name of another field of
    the same Hparams (`top_k <= pool_size`); for a list or tuple value every item is checked."""
    ge: float | str | None = None
    gt: float | str | None = None
    le: float | str | None = None
    lt: float | str | None = None
    choices: tuple | None = None

    _OPS = (("ge", ">=", float.__ge__), ("gt", ">", float.__gt__), ("le", "<=", float.__le__),
            ("lt", "<", float.__lt__))

    def check(self, name: str, value: Any, hp: Any) -> None:
        """Raise ValueError naming `name` unless `value` is allowed (`hp`: the whole Hparams)."""
        items = value if isinstance(value, (list, tuple)) else [value]
        what = f"{name} (each item)" if isinstance(value, (list, tuple)) else name
        for v in items:
            if self.choices is not None and v not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(map(str, self.choices))}, got {v!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if not math.isfinite(v):
                raise ValueError(f"{what} must be a finite number, got {v}")
            for attr, sign, holds in self._OPS:
                bound = getattr(self, attr)
                shown = f"{bound} ({getattr(hp, bound)})" if isinstance(bound, str) else bound
                if isinstance(bound, str):
                    bound = getattr(hp, bound)
                if bound is not None and not holds(float(v), float(bound)):
                    raise ValueError(f"{what} must be {sign} {shown}, got {v}")


def hparam(default: Any = MISSING, *, default_factory: Any = MISSING, ge: float | str | None = None,
           gt: float | str | None = None, le: float | str | None = None,
           lt: float | str | None = None, choices: tuple | None = None, added: bool = False) -> Any:
    """A dataclass field for a hyperparameter, with the values it may take (`Limits`), which
    `Hparams.__post_init__` checks for every method alike: a bad `--set` or YAML value is refused
    before any run, naming the key. `added=True` is `added_hparam`.

    A subclass that redeclares the field with a new default keeps the limits declared above it
    (`epochs: int = 50` in a method's Hparams is still `>= 1`)."""
    metadata: dict[str, Any] = {LIMITS: Limits(ge, gt, le, lt, tuple(choices) if choices else None)}
    if added:
        metadata[KEYLESS_DEFAULT] = True
    return field(default=default, default_factory=default_factory, metadata=metadata)


def added_hparam(default: Any, **limits: Any) -> Any:
    """A dataclass field for a hyperparameter added to a method after its records were published.

    Its default is left out of the resolved hyperparameters (`hparams_key_dict`), so the run keys
    of the published records (the hash of the resolved spec) stay what they were, and a run at the
    default is the same run as before; any other value is written out, so such a run gets its own
    key and its own labelled row. `limits` as for `hparam`."""
    return hparam(default, added=True, **limits)


def hparams_key_dict(hp: Any) -> dict[str, Any]:
    """`asdict(hp)` without the `added_hparam` fields that hold their default: the hyperparameters
    as they enter a run's resolved spec (and its key)."""
    out = asdict(hp)
    for f in fields(hp):
        if f.metadata.get(KEYLESS_DEFAULT) and f.default is not MISSING and out[f.name] == f.default:
            del out[f.name]
    return out


def check_hparams(hp: Any) -> None:
    """Every number finite, and every field within the `Limits` declared for it, here or in a
    base class (`hparam`); ValueError naming the first field that is not."""
    declared: dict[str, Limits] = {}
    for cls in reversed(type(hp).__mro__):  # the most derived declaration wins
        for f in getattr(cls, "__dataclass_fields__", {}).values():
            if LIMITS in f.metadata:
                declared[f.name] = f.metadata[LIMITS]
    for f in fields(hp):  # every number finite first, so a bound naming another field is a number
        value = getattr(hp, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v}")
    for f in fields(hp):
        declared.get(f.name, Limits()).check(f.name, getattr(hp, f.name), hp)


@dataclass
class Hparams:
    """Training hyperparameters shared by every method (each method extends this dataclass).

    Declare a method's own fields with `hparam(default, ge=..., ...)` (or `added_hparam`): the
    checks run here, for every method."""
    epochs: int = hparam(5, ge=1)
    batch_size: int = hparam(32, ge=1)
    lr: float = hparam(1e-3, gt=0)
    optimizer: str = hparam("adam", choices=("adam", "adamw", "sgd"))
    weight_decay: float = hparam(0.0, ge=0)
    momentum: float = hparam(0.9, ge=0, le=1)  # sgd only
    # cosine (per iteration, to 0) | constant
    schedule: str = hparam("cosine", choices=("cosine", "constant"))
    clip_grad: float = hparam(0.0, ge=0)  # max grad norm; 0 = off
    # what the method adds (prompts, keys, ...) trains at lr * prompt_lr_mult, the head at lr;
    # 1.0 = one group (HiDe-Prompt, VQ-Prompt and SMoPE code run prompts at 5x)
    prompt_lr_mult: float = hparam(1.0, ge=0)

    def __post_init__(self):
        check_hparams(self)


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
    comparisons; from zero there is none. Methods that re-fit the head from class statistics
    (HiDe, VQ, SMoPE) are barely affected; the measured effect is in docs/tuning.md.
    One consequence: at the first step of a task nothing behind the head gets gradient (W = 0).
    """

    def __init__(self, vit: PromptedViT, num_classes: int):
        super().__init__()
        self.vit = vit
        self.head = nn.Linear(vit.embed_dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.task_id = 0
        # evaluation modes of the reference code (`PromptStrategy.reference_mode`); none = per sample
        self.reference_modes: frozenset[str] = frozenset()

    def in_reference_mode(self, name: str) -> bool:
        """Whether this evaluation forward reproduces the reference code's behaviour `name` (never
        while training: training follows the hyperparameters alone)."""
        return not self.training and name in self.reference_modes

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


@contextlib.contextmanager
def timed(acc: dict[str, float], key: str):
    """Add the seconds the block takes to acc[key] (train and eval times of a record)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        acc[key] += time.perf_counter() - t0


class ReferenceTest(NamedTuple):
    """How a method's reference code evaluates on one protocol: the reference modes its
    configuration turns on, its test batch size (images of one task's test set per batch, in
    order) and the configuration file:line that says so."""
    modes: tuple[str, ...]
    batch_size: int
    source: str


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
    # "method" competes in the tables; "lower bound" / "upper bound" are references, kept out of
    # the paired tests' Holm family
    role: ClassVar[str] = "method"
    # the method's cumulative ablation ladder: [(label, hparam overrides), ...], first rung to
    # the full method (a protocol's `ablations: {name: {method: m, variants: ladder}}` runs it)
    ABLATION: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    # the reference code's batch-dependent test-time behaviours: mode name -> what it does, with
    # the public code's file:line (see the module docstring); none = the code is per sample
    REFERENCE_MODES: ClassVar[dict[str, str]] = {}
    # protocol name -> the reference configuration's modes and test batch size
    REFERENCE_TESTS: ClassVar[dict[str, ReferenceTest]] = {}

    def __init__(self, *, vit: PromptedViT, num_classes: int, hparams: Any = None,
                 device: str | torch.device = "cpu", eval_mb_size: int = 256,
                 evaluator: EvaluationPlugin | None = None, plugins: list | None = None,
                 precision: str = "fp32", num_tasks: int | None = None,
                 classes_per_task: list[int] | None = None, loader_workers: int | None = None):
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")
        if loader_workers is not None and (isinstance(loader_workers, bool) or int(loader_workers) != loader_workers
                                           or loader_workers < 0):
            raise ValueError(f"loader_workers must be a non-negative integer, got {loader_workers!r}")
        self.precision = precision
        # DataLoader processes (None: by device, see methods.loading); results never depend on it
        self.loader_workers = default_loader_workers(device) if loader_workers is None else int(loader_workers)
        self.pin_memory = torch.device(device).type == "cuda"
        if isinstance(hparams, self.Hparams):
            hp = hparams
        else:
            hp = self.Hparams(**(hparams or {}))
        self.hp = hp
        self.num_classes = num_classes
        # the stream's facts, as the runner knows them before any data is read (None when a
        # strategy is built outside a run, e.g. in a unit test: then only task-time checks apply)
        self.num_tasks = num_tasks
        self.classes_per_task = list(classes_per_task) if classes_per_task is not None else None
        if num_tasks is not None:
            self.check_stream(num_tasks)
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

    @classmethod
    def stream_hparams(cls, num_tasks: int, classes_per_task: list[int]) -> dict[str, Any]:
        """Hyperparameters that follow from the stream (e.g. one E-prompt per task): computed
        here, never repeated in `DEFAULTS`. They are resolved after `DEFAULTS` and before the
        protocol YAML and command-line overrides, so a user can still set them."""
        return {}

    def check_stream(self, num_tasks: int) -> None:
        """Raise ValueError, before any training, when the hyperparameters cannot serve a stream
        of `num_tasks` tasks (e.g. fewer E-prompts than tasks)."""

    def task_start(self) -> None:
        """Per-task set-up before the optimizer is built (freeze, initialise, snapshot)."""

    def task_end(self) -> None:
        """Per-task stage after the task's epochs (statistics, alignment, counters)."""

    def aux_loss(self) -> Tensor | None:
        """Extra training loss for the current minibatch (key pull, orthogonality, ...)."""
        return None

    # ------------------------------------------------------------------ the protocol
    def fit(self, train_stream, test_stream) -> Iterator[int]:
        """Learn `train_stream` task by task; after task i, evaluate tasks 0..i of `test_stream`
        and yield i. Every accuracy reaches the caller through its evaluation plugins, and
        `self.seconds` holds the training and evaluation wall time. A reference that does not
        learn task by task (`joint`) overrides this and nothing else of the protocol."""
        self.seconds = {"train": 0.0, "eval": 0.0}
        for i, exp in enumerate(train_stream):
            with timed(self.seconds, "train"):
                self.train(exp, eval_streams=[])
            with timed(self.seconds, "eval"):
                self.eval(test_stream[:i + 1])
            yield i

    @contextlib.contextmanager
    def reference_mode(self, *names: str) -> Iterator[None]:
        """Evaluate, inside the block, with the reference code's batch-dependent behaviours
        `names` (keys of `REFERENCE_MODES`; none = per sample). The strategy's `eval_mb_size` then
        decides what a batch is: Avalanche evaluates one experience (one task's test set) at a
        time, in order, as the reference codes do. Training inside the block is unaffected."""
        unknown = [n for n in names if n not in self.REFERENCE_MODES]
        if unknown:
            valid = ", ".join(self.REFERENCE_MODES) or "none (its reference code is per sample)"
            raise ValueError(f"{self.name or type(self).__name__}: unknown reference mode(s) "
                             f"{', '.join(map(repr, unknown))}; valid: {valid}")
        before = self.model.reference_modes
        self.model.reference_modes = frozenset(names)
        try:
            yield
        finally:
            self.model.reference_modes = before

    @torch.no_grad()
    def accuracy(self, dataset, batch_size: int) -> float:
        """Top-1 accuracy (%) on `dataset` (an Avalanche dataset, read with its eval transform, in
        its own order), `batch_size` images per forward, predicted as an evaluation predicts
        (the seen classes; the reference modes that are on), but outside Avalanche's evaluation
        loop: no plugin, logger or metric sees it, so it can re-evaluate a trained model without
        touching a run's record. The model's train/eval state is restored. Each pass draws one
        seed from the global RNG (`methods.loading`): fork the RNG around it inside a run."""
        was_training = self.model.training
        self.model.eval()
        right = total = 0
        try:
            for x, y in self.loader(dataset, batch_size=batch_size):
                with self.autocast():
                    logits = self.model(x)
                pred = self.mask_logits(logits.float(), training=False).argmax(1)
                right += int((pred == y).sum())
                total += int(y.shape[0])
        finally:
            self.model.train(was_training)
        if not total:
            raise ValueError("accuracy of an empty dataset")
        return 100.0 * right / total

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
        statistics (the run is in docs/tuning.md). Off (fp32) by default."""
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
            if not torch.isfinite(loss.detach()):
                # stop at once, and say where: a NaN would otherwise spread through every
                # parameter and end as a run of random predictions that looks like a result
                c = self.clock
                raise FloatingPointError(
                    f"{self.name or type(self).__name__}: training loss is {loss.item()} at task "
                    f"{self.task_id}, epoch {c.train_exp_epochs}, step {c.train_epoch_iterations}")
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

    # ------------------------------------------------------------------ data loading
    def make_train_dataloader(self, shuffle: bool = True, drop_last: bool = False, **kwargs):
        """The task's training loader (replaces Avalanche's TaskBalancedDataLoader, which for the
        suite's single-task-label streams is a plain shuffled loader with the same draws), kept
        with its workers for all the task's epochs."""
        self.dataloader = make_loader(
            self.adapted_dataset, batch_size=self.train_mb_size, shuffle=shuffle, drop_last=drop_last,
            workers=self.loader_workers, pin_memory=self.pin_memory, persistent=self.train_epochs > 1,
            collate_fn=self.adapted_dataset.collate_fn)

    def make_eval_dataloader(self, **kwargs):
        self.dataloader = make_loader(
            self.adapted_dataset, batch_size=self.eval_mb_size, workers=self.loader_workers,
            pin_memory=self.pin_memory, collate_fn=self.adapted_dataset.collate_fn)

    def loader(self, dataset, *, train_transform: bool = False, batch_size: int | None = None,
               shuffle: bool = False, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate (x, y) on the device over an Avalanche dataset, with its train or eval
        transforms (statistics passes, frequency counting)."""
        ds = dataset.train() if train_transform else dataset.eval()
        dl = make_loader(ds, batch_size=batch_size or self.eval_mb_size, shuffle=shuffle,
                         drop_last=drop_last, workers=self.loader_workers, pin_memory=self.pin_memory)
        for batch in dl:
            yield (batch[0].to(self.device, non_blocking=self.pin_memory),
                   batch[1].to(self.device, non_blocking=self.pin_memory))

    def hparams_dict(self) -> dict[str, Any]:
        return hparams_key_dict(self.hp)

    @classmethod
    def hparam_names(cls) -> list[str]:
        return [f.name for f in fields(cls.Hparams)]
