"""Protocol YAML files: what is run (data, tasks, class order, transforms) and their validation.

A protocol is one YAML file in `protocols/` (or any path). Unknown keys, wrong types and values
outside the allowed sets are errors that name the file, the key and what is allowed, so a typo
never silently falls back to a default.

Keys:
  name, description, dataset (fashion_mnist | cifar100 | imagenet_r | cub200), num_tasks,
  class_order (shuffled | natural), augment (none | rrc_flip), eval_resize (resize | resize_crop),
  normalize (none | backbone), subsample ({train_per_class, test_per_class} or null),
  split (ImageNet-R only: coda, the default, | stratified; see benchmarks/imagenet_r.py),
  split_file (ImageNet-R only, or null; replaces split), first_tasks (null, or k: train and evaluate
  only the first k tasks of the stream, whose classes per task, head and hyperparameters stay those
  of num_tasks; the real-shape dry run's reduced form, protocols/smoke.py),
  backbones (default backbones, first = default),
  methods ({method: {hparam: value}}: protocol-level overrides of the methods' defaults),
  ablations ({name: {method: m, variants: ladder | {label: {hparam: value}}}}: sweeps that the
  leaderboard renders as their own table; `ladder` takes the method's own `ABLATION` list).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks import DATASET_FACTS, classes_per_exp
from benchmarks.streams import CLASS_ORDERS, SPLITS
from benchmarks.transforms import AUGMENTS, EVAL_RESIZES

from .errors import ProtocolError

PROTOCOL_DIR = Path(__file__).resolve().parent

# the allowed values are the data package's own constants: one list, validated here once
_CHOICES = {
    "dataset": tuple(DATASET_FACTS),
    "class_order": CLASS_ORDERS,
    "augment": AUGMENTS,
    "eval_resize": EVAL_RESIZES,
    "normalize": ("none", "backbone"),
    "split": SPLITS,
}
_TYPES: dict[str, tuple[type, ...]] = {
    "name": (str,), "description": (str,), "dataset": (str,), "num_tasks": (int,),
    "class_order": (str,), "augment": (str,), "eval_resize": (str,), "normalize": (str,),
    "subsample": (dict, type(None)), "split": (str,), "split_file": (str, type(None)),
    "first_tasks": (int, type(None)), "backbones": (list,),
    "methods": (dict,), "ablations": (dict,),
}
_REQUIRED = ("name", "dataset", "num_tasks")


@dataclass(frozen=True)
class Ablation:
    method: str
    variants: str | dict[str, dict[str, Any]]  # "ladder" or {label: overrides}


@dataclass(frozen=True)
class Protocol:
    name: str
    dataset: str
    num_tasks: int
    description: str = ""
    class_order: str = "shuffled"
    augment: str = "none"
    eval_resize: str = "resize"
    normalize: str = "none"
    subsample: dict[str, int] | None = None
    split: str | None = None  # ImageNet-R: "coda" unless split_file is set; None for other data
    split_file: str | None = None
    first_tasks: int | None = None  # run only the first k tasks (None: all num_tasks)
    backbones: tuple[str, ...] = ()
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    ablations: dict[str, Ablation] = field(default_factory=dict)
    path: str = ""

    @property
    def num_classes(self) -> int:
        return DATASET_FACTS[self.dataset].num_classes

    @property
    def classes_per_task(self) -> list[int]:
        """Class counts per task (the stream's facts, known before any data is read)."""
        return classes_per_exp(self.num_classes, self.num_tasks)

    @property
    def shipped(self) -> bool:
        """Whether this is the suite's own protocol file of that name (not a user's copy)."""
        return Path(self.path).resolve() == (PROTOCOL_DIR / f"{self.name}.yaml").resolve()

    def data_spec(self) -> dict[str, Any]:
        """The part of the protocol that defines the data and its stream (goes in the run key).
        `split` only for ImageNet-R and `first_tasks` only when set, so the keys of the runs
        made before them stay what they were."""
        spec = {k: getattr(self, k) for k in (
            "name", "dataset", "num_tasks", "class_order", "augment", "eval_resize", "normalize",
            "subsample", "split_file")}
        if self.dataset == "imagenet_r":
            spec["split"] = self.split
        if self.first_tasks is not None:
            spec["first_tasks"] = self.first_tasks
        return spec


def available() -> list[str]:
    """Names of the protocols shipped in `protocols/`."""
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def _fail(where: str, msg: str) -> None:
    raise ProtocolError(f"{where}: {msg}")


def validate(raw: Any, where: str) -> Protocol:
    if not isinstance(raw, dict):
        _fail(where, "a protocol must be a YAML mapping")
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        _fail(where, f"unknown key(s) {unknown}; valid keys: {', '.join(_TYPES)}")
    for key in _REQUIRED:
        if key not in raw:
            _fail(where, f"missing required key {key!r}")
    for key, value in raw.items():
        types = _TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            _fail(where, f"{key} must be {names}, got {type(value).__name__} {value!r}")
        if key in _CHOICES and value not in _CHOICES[key]:
            _fail(where, f"{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    n_classes = DATASET_FACTS[raw["dataset"]].num_classes
    if not 1 <= raw["num_tasks"] <= n_classes:
        _fail(where, f"num_tasks must be in 1..{n_classes} ({raw['dataset']} has {n_classes} "
                     f"classes), got {raw['num_tasks']}")
    first = raw.get("first_tasks")
    if first is not None and not 1 <= first <= raw["num_tasks"]:
        _fail(where, f"first_tasks must be in 1..num_tasks={raw['num_tasks']} (or null for all), "
                     f"got {first}")
    sub = raw.get("subsample")
    if sub is not None:
        bad = sorted(set(sub) - {"train_per_class", "test_per_class"})
        if bad:
            _fail(where, f"subsample keys are train_per_class and test_per_class, got {bad}")
        for k, v in sub.items():
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                _fail(where, f"subsample.{k} must be a positive integer or null, got {v!r}")
    for key in ("split", "split_file"):
        if raw.get(key) and raw["dataset"] != "imagenet_r":
            _fail(where, f"{key} is only used by the imagenet_r dataset")
    if raw.get("split") and raw.get("split_file"):
        _fail(where, "give split (a named split) or split_file (your own list), not both")
    for b in raw.get("backbones", []):
        if not isinstance(b, str):
            _fail(where, f"backbones must be a list of names, got {b!r}")
    for m, hp in raw.get("methods", {}).items():
        if not isinstance(hp, dict):
            _fail(where, f"methods.{m} must be a mapping of hyperparameters, got {hp!r}")
    ablations = {}
    for name, ab in raw.get("ablations", {}).items():
        if not isinstance(ab, dict) or set(ab) - {"method", "variants"} or "method" not in ab:
            _fail(where, f"ablations.{name} must be {{method: NAME, variants: ladder | {{label: {{...}}}}}}")
        variants = ab.get("variants", "ladder")
        if variants != "ladder" and not (isinstance(variants, dict)
                                         and all(isinstance(v, dict) for v in variants.values())):
            _fail(where, f"ablations.{name}.variants must be 'ladder' or a mapping label -> overrides")
        ablations[name] = Ablation(method=ab["method"], variants=variants)
    fields = {k: v for k, v in raw.items() if k not in ("ablations", "backbones")}
    if raw["dataset"] == "imagenet_r" and not raw.get("split_file"):
        fields.setdefault("split", "coda")
    return Protocol(**fields, backbones=tuple(raw.get("backbones", [])), ablations=ablations, path=where)


def load_protocol(name_or_path: str | Path) -> Protocol:
    """A shipped protocol by name (`fmnist-5t`) or any YAML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PROTOCOL_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ProtocolError(f"no protocol {str(name_or_path)!r}: {path} not found; "
                            f"shipped protocols: {', '.join(available())}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ProtocolError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); a protocol "
                            "is a YAML text file") from None
    except yaml.YAMLError as e:
        raise ProtocolError(f"{path}: not valid YAML: {e}") from None
    return validate(raw, str(path))
