"""A sweep: protocols x backbones x (methods | ablation rungs) x seeds -> run specs -> records.

`plan` turns a `SweepRequest` into `RunSpec`s (checking every name, seed count and that each
method has hyperparameters for each protocol before anything runs); `pending` says which of them
the store already holds, complete and made by the code of now (a run whose code changed since is
stale, and runs again); `execute_pending` runs the others on an executor and hands each record to
the store as it arrives.
The store is passed in (anything with `has(key)` and `put(record)`): this package never imports
the leaderboard, which is built from records alone.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol as TypingProtocol

from methods import backbones, registry

from .code_identity import code_identity, stale_reason
from .devices import check_device, check_gpus
from .errors import USER_ERRORS, ExecutorError, SweepError
from .executors import RunFailure, execute
from .record import failed_record, seal_record, utc_now
from .runner import RunOptions, RunSpec, config_keys, method_hparams, record_identity, versions
from .schema import Protocol, available, load_protocol


class Store(TypingProtocol):
    def has(self, key: str) -> bool: ...
    def put(self, record: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SweepRequest:
    """What a user asks for (the CLI's flags, parsed)."""
    protocols: Sequence[str] = ("fmnist-5t",)  # names or YAML paths; ("all",) = every shipped one
    backbones: str | Sequence[str] = "default"  # "default" (each protocol's first), "all", or names
    methods: Sequence[str] = ("all",)  # ("all",), () for none, or names
    ablations: Sequence[str] = ()  # ablation names of the protocols, or ("all",)
    seeds: int = 5
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> {hparam: value}
    precision: str = "fp32"


def parse_overrides(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """`["smope.top_k=3", ...]` -> {"smope": {"top_k": "3"}} (values are coerced per hparam)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        lhs, eq, value = item.partition("=")
        method, dot, key = lhs.partition(".")
        if not (eq and dot and method and key):
            raise SweepError(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        out.setdefault(method, {})[key] = value
    return out


def resolve_backbones(protocol: str, choice: str) -> list[str]:
    """`--backbones` for one protocol: "default" (its first), "all" (its list) or a comma list."""
    return backbones_for(load_protocol(protocol), choice if choice in ("default", "all")
                         else [b.strip() for b in choice.split(",") if b.strip()])


def backbones_for(proto: Protocol, choice: str | Sequence[str]) -> list[str]:
    """The backbones of `proto` a choice names: "default" (its first), "all" (its list) or names
    (SweepError for an unknown one)."""
    if choice == "default":
        bbs = list(proto.backbones[:1]) or ["tiny"]
    elif choice == "all":
        bbs = list(proto.backbones) or ["tiny"]
    else:
        bbs = list(choice)
    known = backbones.names()
    for bb in bbs:
        if bb not in known:
            raise SweepError(f"unknown backbone {bb!r}; valid: {', '.join(known)}")
    return bbs


def plan(req: SweepRequest) -> list[RunSpec]:
    """The RunSpecs of a request, in order (protocol, backbone, main methods then ablation rungs,
    seed). Raises SweepError / UnknownMethodError / ProtocolError before anything runs."""
    return [replace(config, seed=seed) for config in configurations(req) for seed in range(req.seeds)]


def configurations(req: SweepRequest) -> list[RunSpec]:
    """One RunSpec per configuration of a request (at seed 0), in `plan`'s order: what is checked,
    resolved and estimated once however many seeds run it (`plan` is each of them at seeds
    0..N-1). Raises SweepError / UnknownMethodError / ProtocolError before anything runs."""
    if isinstance(req.seeds, bool) or not isinstance(req.seeds, int) or req.seeds < 1:
        raise SweepError(f"--seeds must be a positive number of seeds (runs use seeds 0..N-1), "
                         f"got {req.seeds!r}")
    if req.precision not in ("fp32", "bf16"):
        raise SweepError(f"precision must be fp32 or bf16, got {req.precision!r}")
    protocols = available() if list(req.protocols) == ["all"] else list(req.protocols)
    if not protocols:
        raise SweepError("no protocol given")
    methods = registry.names() if list(req.methods) == ["all"] else list(req.methods)
    for m in methods + list(req.overrides):
        registry.get(m)  # unknown names fail here, with the list of valid ones
    specs: list[RunSpec] = []
    for pname in protocols:
        proto = load_protocol(pname)
        for m in proto.methods:  # a misspelt name would leave the method at its defaults, silently
            if m not in registry.names():
                raise SweepError(f"{proto.path}: methods: {m!r} is not a registered method (a typo, or a "
                                 f"plugin not loaded: --plugin FILE.py); registered: {', '.join(registry.names())}")
        # a YAML path stays a (resolved) path, so workers elsewhere can read it
        where = str(Path(pname).resolve()) if Path(pname).suffix else proto.name
        runs: list[tuple[str, str, str, int, dict]] = [(m, "", "main", 0, {}) for m in methods]
        names = list(proto.ablations) if list(req.ablations) == ["all"] else list(req.ablations)
        for ab_name in names:
            if ab_name not in proto.ablations:
                raise SweepError(f"protocol {proto.name} has no ablation {ab_name!r}; "
                                 f"it has: {', '.join(proto.ablations) or 'none'}")
            ab = proto.ablations[ab_name]
            if ab.variants == "ladder" and not registry.get(ab.method).ABLATION:
                raise SweepError(f"{proto.path}: ablations.{ab_name} asks for the ladder of {ab.method!r}, "
                                 f"which defines none; list the variants instead "
                                 f"(variants: {{label: {{hparam: value}}}})")
            variants = registry.ablation(ab.method) if ab.variants == "ladder" else list(ab.variants.items())
            runs += [(ab.method, label, f"ablation:{ab_name}", pos, dict(rung))
                     for pos, (label, rung) in enumerate(variants)]
        for method in sorted({r[0] for r in runs}):
            if not registry.has_defaults(method, proto.name) and method not in proto.methods:
                cls = registry.get(method)
                have = ", ".join(sorted(cls.DEFAULTS)) or "none"
                raise SweepError(
                    f"method {method!r} has no hyperparameters for protocol {proto.name!r} (it has "
                    f"defaults for: {have}); add `methods: {{{method}: {{...}}}}` to the protocol "
                    f"YAML, or give the method generic defaults (DEFAULTS['*'])")
        if not runs:
            raise SweepError(f"nothing to run on {proto.name}: no method and no ablation selected")
        _check_hparams(proto, runs, req.overrides)
        for bb in backbones_for(proto, req.backbones):
            for method, label, table, position, rung in runs:
                specs.append(RunSpec(where, bb, method, 0, dict(req.overrides.get(method, {})),
                                     label, table, position, req.precision, rung))
    return specs


def check_options(options: RunOptions, executor: str = "local", workers: int | None = 1, *,
                  gpus_per_run: float | None = None, timeout_min: int | None = None) -> None:
    """Refuse, before anything runs or is created, options every run would fail on (SweepError,
    ExecutorError). `workers`, `gpus_per_run` and `timeout_min` are the user's values (None: not
    given); `timeout_min` is Slurm's."""
    for name, value, least in (("--threads", options.threads, 1), ("--eval-batch-size", options.eval_batch_size, 1),
                               ("--loader-workers", options.loader_workers, 0), ("--workers", workers, 1),
                               ("--slurm-timeout-min", timeout_min, 1)):
        if value is not None and (isinstance(value, bool) or value < least):
            raise SweepError(f"{name} must be at least {least}, got {value}")
    check_device(options.device, executor)
    check_gpus(options.device, gpus_per_run)
    if executor == "ray":
        _importable("ray", "--executor ray needs Ray: pip install 'promptcl[ray]'")
    elif executor == "slurm":
        _importable("submitit", "--executor slurm needs submitit: pip install 'promptcl[slurm]'")


def _importable(module: str, message: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ExecutorError(message) from None


def _check_hparams(proto, runs, overrides: dict[str, dict[str, Any]]) -> None:
    """Resolve every run's hyperparameters layer by layer, so that a bad value names where it
    was written: the protocol YAML's `methods:`, an ablation's variant, or `--set`."""
    for method in sorted({r[0] for r in runs}):
        try:
            method_hparams(method, proto)
        except registry.HparamError as e:
            if method not in proto.methods:  # the method's own defaults: a bug, not the YAML
                raise
            raise registry.HparamError(f"{proto.path}: methods.{method}: {e}") from None
        try:
            method_hparams(method, proto, overrides.get(method, {}))
        except registry.HparamError as e:
            raise registry.HparamError(f"--set: {e}") from None
    for method, label, table, _, rung in runs:
        if rung:
            try:
                method_hparams(method, proto, rung)
            except registry.HparamError as e:
                raise registry.HparamError(f"{proto.path}: {table.replace(':', 's.', 1)} variant "
                                           f"{label!r}: {e}") from None


def keyed(specs: Sequence[RunSpec]) -> list[tuple[RunSpec, str]]:
    """Each spec with its run key (the hash of its resolved spec, `runner.spec_key`), each
    configuration resolved once (`runner.config_keys`), not once per seed."""
    keys: dict[RunSpec, Callable[[int], str]] = {}
    protocols: dict[str, Protocol] = {}
    out = []
    for s in specs:
        config = replace(s, seed=0)
        if config not in keys:
            if s.protocol not in protocols:
                protocols[s.protocol] = load_protocol(s.protocol)
            keys[config] = config_keys(config, protocols[s.protocol])
        out.append((s, keys[config](s.seed)))
    return out


def seeds_to_run(configs: Sequence[RunSpec], seeds: int, stored: Mapping[str, int]) -> list[tuple[RunSpec, int]]:
    """Each configuration with how many of its seeds 0..seeds-1 are not stored yet, in time and
    memory that do not grow with `seeds`: only the seeds `stored` ({key: seed} of the complete
    runs a sweep would keep, `fresh_runs`) holds are hashed. What a dry run of any size counts."""
    held = sorted({s for s in stored.values() if 0 <= s < seeds})
    protocols: dict[str, Protocol] = {}
    out = []
    for config in configs:
        if not held:
            out.append((config, seeds))
            continue
        if config.protocol not in protocols:
            protocols[config.protocol] = load_protocol(config.protocol)
        key = config_keys(config, protocols[config.protocol])
        out.append((config, seeds - sum(stored.get(key(s)) == s for s in held)))
    return out


def fresh_runs(records: Iterable[Mapping[str, Any]], rerun: bool = False) -> dict[str, int]:
    """{key: seed} of the stored complete runs a sweep would keep (`pending`'s rule: made by the
    code of now); none with `rerun`."""
    if rerun:
        return {}
    now: dict[str, dict[str, Any]] = {}
    out = {}
    for r in records:
        if r.get("status", "ok") != "ok":
            continue
        if r["method"] not in now:
            now[r["method"]] = code_identity(r["method"])
        if stale_reason(r.get("code"), now[r["method"]]) is None:
            out[r["key"]] = int(r["seed"])
    return out


@dataclass
class Pending:
    """Which planned runs a sweep runs, and why each stored one runs again."""
    todo: list[RunSpec] = field(default_factory=list)
    kept: int = 0  # complete runs stored by the code of now: not run again
    stale: Counter = field(default_factory=Counter)  # why -> stored complete runs run again for it
    forced: int = 0  # stored complete runs run again because the user asked (--rerun)

    @property
    def rerun(self) -> int:
        return sum(self.stale.values()) + self.forced

    def lines(self) -> list[str]:
        """What is run again and why, one line each ([] when nothing is)."""
        out = [f"  {n} stale run(s) run again: {why}" for why, n in sorted(self.stale.items())]
        if self.forced:
            out.append(f"  {self.forced} stored run(s) run again: --rerun")
        return out


def pending(specs: Sequence[tuple[RunSpec, str]], stored: Callable[[str], dict[str, Any] | None],
            rerun: bool = False) -> Pending:
    """Sort keyed `specs` (`keyed`) by what `stored(key)` (the store's record, or None) holds: a
    complete run made by the code of now (`protocols.code_identity`) is kept; one made by other
    code is stale and runs again, and so does one that recorded no code (made before records
    carried it: its code cannot be known); a missing or failed run runs; `rerun` runs them all."""
    out = Pending()
    now: dict[str, dict[str, Any]] = {}
    for spec, key in specs:
        record = stored(key)
        if record is None or record.get("status", "ok") != "ok":
            out.todo.append(spec)
            continue
        if rerun:
            out.forced += 1
            out.todo.append(spec)
            continue
        if spec.method not in now:
            now[spec.method] = code_identity(spec.method)
        why = stale_reason(record.get("code"), now[spec.method])
        if why is None:
            out.kept += 1
        else:
            out.stale[why] += 1
            out.todo.append(spec)
    return out


def execute_pending(todo: Sequence[RunSpec], store: Store, options: RunOptions, *,
                    executor: str = "local", argv: Sequence[str] = (), **executor_kw
                    ) -> Iterator[tuple[RunSpec, dict[str, Any]]]:
    """Run `todo` on `executor`, stamp each record with the user's command line (`argv`: the
    driver's, never a worker's), store it as soon as it arrives, and yield it.

    A run that raises becomes a failed record (status "failed", its error and traceback): it is
    stored, yielded, and retried by the next sweep, and the sweep goes on. An error the user must
    fix (missing data, unusable weights, ...: `USER_ERRORS`) would fail every run alike, so it
    stops the sweep instead, as itself."""
    outcomes = execute(executor, list(todo), options, failures="yield", **executor_kw)
    with closing(outcomes):
        for spec, outcome in outcomes:
            if isinstance(outcome, RunFailure):
                if isinstance(outcome.exception, USER_ERRORS):
                    raise outcome.exception
                record = failed_record(record_identity(spec), error=outcome.error,
                                       traceback=outcome.traceback, versions=versions(), created=utc_now())
            else:
                record = outcome
            record["argv"] = list(argv)
            record = seal_record(record)  # the last change: any later edit is found on load
            store.put(record)
            yield spec, record

