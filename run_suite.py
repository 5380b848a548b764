#!/usr/bin/env python
"""promptcl: run protocols x backbones x methods x seeds, store every run, write the leaderboard.

    python run_suite.py --methods all --seeds 5            # a sweep of the default protocol (fmnist-5t, tiny)
    python run_suite.py --methods all --ablation all --seeds 5   # ... and its ablations (make suite)
    python run_suite.py sweep --protocols cifar100-10t --backbones sup21k --methods l2p,smope --seeds 5
    python run_suite.py dry-run --protocols all --backbones all --seeds 5    # how long would it take?
    python run_suite.py list                                # methods, protocols, backbones, ablations
    python run_suite.py fetch --protocols cifar100-10t --backbones sup21k   # data + weights, verified
    python run_suite.py check --protocols cifar100-10t --backbones sup21k   # what is there, what is not
    python run_suite.py publish                             # local runs -> leaderboard/records/
    python run_suite.py publish cluster.sqlite              # merge a store made elsewhere
    python run_suite.py report                              # re-render the local pages, run nothing
    python run_suite.py report --published                  # re-render the committed pages from the records
    python run_suite.py export runs.csv                     # published + local runs, one row each
    python run_suite.py cost --protocols cifar100-10t --backbones sup21k --random-init
    python run_suite.py profile --protocols cifar100-10t --backbones sup21k   # images/s here
    python run_suite.py smoke --tasks 2 --protocols cifar100-10t   # the real path, quickly
    python run_suite.py reference --methods l2p --seeds 5   # re-evaluated as the public code evaluates

Each command takes its own options (`run_suite.py COMMAND --help`) and refuses any other. Options
without a command are a sweep's (`run_suite.py --methods all --seeds 5` is `run_suite.py sweep
--methods all --seeds 5`); no argument at all is the default sweep.

A sweep skips runs whose key is already in the local store, complete and made by the code of now
(a run records a hash of its code: one whose code changed since is stale and runs again; --rerun
runs them all); a run is stored only once complete, so an interrupted sweep resumes where it
stopped. Runs whose key is published are compared with the published record (the reproduction
line). A sweep renders the local pages (results/leaderboard/): the published records plus the
local runs not published yet, marked (local). The committed pages (leaderboard/) are rendered from
the published records alone, by `publish` and `report --published`; publishing is explicit.

The published records, profile and smoke records and the pages are found from the working
directory (leaderboard/records/, leaderboard/profiles/, leaderboard/smoke/, leaderboard/,
results/leaderboard/): run from the repository's root, or give --records-dir, --profiles-dir,
--smoke-dir, --leaderboard-dir, --local-leaderboard-dir.

Exit codes: 0 done; 1 the sweep finished but some runs failed (stored as failed, listed, retried
by the next sweep); 2 an input the user can fix (one `error:` line, nothing run or changed); 130
interrupted (Ctrl-C; rerun to resume).
"""
# This file parses, dispatches and prints; the work is in protocols/ and leaderboard/. A command
# is one function registered with `@command` (its name, help and options); the packages are
# imported inside the commands, after the warning filters are set (Avalanche warns when it is
# imported), so that --help and a mistyped option answer without loading torch.
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

#: warnings that say nothing to a user of the suite: Avalanche imports qpsolvers, which has no
#: solver here (only GEM / A-GEM need one); an Avalanche evaluator without loggers (quiet runs)
SILENCED = ("no QP solver found", "No loggers specified")


def quiet_imports() -> None:
    """Silence `SILENCED` here and in every worker process a sweep starts (local pool, local
    Ray): a spawned interpreter reads PYTHONWARNINGS before its first import."""
    for message in SILENCED:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    ours = [f"ignore:{message}:UserWarning" for message in SILENCED]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [w for w in ours if w not in given])


def split(value: str | None) -> list[str]:
    """A comma list as the options take it: "l2p, smope," -> ["l2p", "smope"]."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


# ------------------------------------------------------------------------------------ options

def options() -> dict[str, tuple[tuple[str, ...], dict]]:
    """Every option of every command: name -> (flags, argparse keywords). Read when parsing, so
    that a default taken from the environment is the environment's at that moment."""
    return {
        # what to run
        "methods": (("--methods",), dict(
            default=None, help="'all' (default; with --ablation in a sweep: 'none'), 'none', or a comma "
                               "list (see `list`)")),
        "ablation": (("--ablation",), dict(
            action="append", default=[], metavar="NAME",
            help="also run the protocol's ablation NAME ('all': every one), its own table (repeatable)")),
        "seeds": (("--seeds",), dict(type=int, default=5, help="seeds 0..N-1 (default 5)")),
        "protocols": (("--protocols",), dict(
            default="fmnist-5t", help="comma list of protocol names or YAML paths, or 'all' (default %(default)s; "
                                      "smoke's 'real': every protocol on real data)")),
        "backbones": (("--backbones",), dict(
            default="default", help="comma list, 'default' (each protocol's first) or 'all' (each protocol's list)")),
        "set": (("--set",), dict(
            action="append", default=[], metavar="METHOD.KEY=VALUE",
            help="override a hyperparameter, e.g. --set smope.top_k=3 (repeatable; such runs get their own "
                 "labelled rows)")),
        "precision": (("--precision",), dict(
            choices=["fp32", "bf16"], default="fp32",
            help="bf16: autocast of the minibatch forward (for GPUs; part of the run key)")),
        # where things are
        "data_root": (("--data-root",), dict(
            default=None, help="folder of the data sets (default data/, or $PROMPTCL_DATA_ROOT); a folder you "
                               "name is never replaced by the system copy of Fashion-MNIST")),
        "weights_dir": (("--weights-dir",), dict(default="pretrained", help="folder of the ViT-B/16 checkpoints")),
        "store": (("--store",), dict(default="results/suite.sqlite",
                                     help="the local SQLite run store (default %(default)s)")),
        "records_dir": (("--records-dir",), dict(
            default=None, help="published records (default leaderboard/records/ in the working directory)")),
        "profiles_dir": (("--profiles-dir",), dict(
            default=None, help="profile records (default leaderboard/profiles/ in the working directory)")),
        "smoke_dir": (("--smoke-dir",), dict(
            default=None, help="smoke records (default leaderboard/smoke/ in the working directory)")),
        "leaderboard_dir": (("--leaderboard-dir",), dict(
            default=None, help="the committed pages, written only from the published records, by `publish` and "
                               "`report --published` (default leaderboard/ in the working directory)")),
        "local_leaderboard_dir": (("--local-leaderboard-dir",), dict(
            default=None, help="the local pages: the published records plus the local store's runs not "
                               "published, marked (local) (default results/leaderboard/ in the working directory)")),
        "published": (("--published",), dict(
            action="store_true", help="render the committed pages (--leaderboard-dir) from the published records "
                                      "alone, instead of the local pages; a no-op on a clean checkout")),
        "no_render": (("--no-render",), dict(action="store_true", help="do not render the pages")),
        # how to run
        "device": (("--device",), dict(default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0, ...")),
        "eval_batch_size": (("--eval-batch-size",), dict(type=int, default=256,
                                                         help="results never depend on it (default 256)")),
        "threads": (("--threads",), dict(
            type=int, default=None, help="torch CPU threads per run (default 1: a run's numbers can depend on the "
                                         "thread count, rarely; records say which)")),
        "plugin": (("--plugin",), dict(
            action="append", default=[], metavar="FILE.py|module",
            help="import a method plugin (repeatable); the only code the suite runs that is not its own")),
        "download": (("--download",), dict(action="store_true", help="let torchvision download Fashion-MNIST")),
        "allow_download": (("--allow-download",), dict(
            action="store_true", help="let timm fetch sup21k / sup1k weights from its hub if no file is found")),
        "quiet": (("--quiet",), dict(action="store_true", help="no progress bars, only result lines")),
        "verbose": (("--verbose",), dict(action="store_true", help="Avalanche's per-experience logs too")),
        "workers": (("--workers",), dict(
            type=int, default=None, help="local runs in N worker processes of --threads (default 1) torch threads "
                                         "each (default: as many as the CPUs hold; 1 = in this process)")),
        "loader_workers": (("--loader-workers",), dict(
            type=int, default=None, help="DataLoader worker processes per run (default: 0 on CPU, up to 8 on "
                                         "CUDA); results never depend on it")),
        "executor": (("--executor",), dict(choices=["local", "ray", "slurm"], default="local",
                                           help="where runs execute; only this driver writes the store")),
        "gpus_per_run": (("--gpus-per-run",), dict(
            type=float, default=None, help="GPUs a Ray task or Slurm job asks for (default: 1 unless --device cpu)")),
        "address": (("--address",), dict(default=None, help="Ray cluster address (with --executor ray)")),
        "slurm_partition": (("--slurm-partition",), dict(default=None)),
        "slurm_timeout_min": (("--slurm-timeout-min",), dict(type=int, default=720)),
        "slurm_folder": (("--slurm-folder",), dict(default="results/slurm")),
        # what some commands alone take
        "profile_batch": (("--profile-batch",), dict(
            type=int, default=None, metavar="N",
            help="measure at batch N instead of each method's own (the record says so; for slow CPUs)")),
        "random_init": (("--random-init",), dict(
            action="store_true", help="the backbone with random weights (nothing read or fetched)")),
        "format": (("--format",), dict(choices=["table", "json"], default="table", help="output format")),
        "tasks": (("--tasks",), dict(
            type=int, default=None, metavar="K",
            help="only the first K tasks of each protocol (same stream, head and hyperparameters; the "
                 "reduced form CI runs)")),
        "source": (("source",), dict(
            nargs="?", default=None, metavar="STORE",
            help="the run store to publish, e.g. one made on a cluster (default: --store)")),
        "csv": (("csv",), dict(metavar="FILE.csv", help="the CSV file to write")),
        "mirror": (("--mirror",), dict(
            default=None, metavar="URL|FOLDER",
            help="fetch each file as <mirror>/<file name> instead of from its authors (a cluster's mirror, "
                 "or a folder holding copies)")),
        "verify": (("--verify",), dict(action="store_true",
                                       help="hash every file against its checksum (slow for big files)")),
        "rerun": (("--rerun",), dict(
            action="store_true", help="run every planned run again, also those stored by the code of now (a "
                                      "stored run whose code changed runs again anyway)")),
        "batch_sizes": (("--batch-sizes",), dict(
            default="16,64", metavar="B,B,...",
            help="test batch sizes of the re-evaluations under the methods' reference modes, besides each "
                 "reference configuration's own and batch 1 (reference: 16,64 unless given; smoke: none unless "
                 "given)")),
    }


WHAT = ("methods", "ablation", "seeds", "protocols", "backbones", "set", "precision")
HOW = ("data_root", "weights_dir", "device", "eval_batch_size", "threads", "plugin", "download", "allow_download",
       "quiet", "verbose", "workers", "loader_workers", "executor", "gpus_per_run", "address",
       "slurm_partition", "slurm_timeout_min", "slurm_folder")
#: what rendering the pages reads and writes (every command that renders takes these)
PAGES = ("store", "records_dir", "profiles_dir", "smoke_dir", "leaderboard_dir", "local_leaderboard_dir", "no_render")
#: what rendering the committed pages alone reads and writes (the commands that add measurement records)
COMMITTED_PAGES = ("records_dir", "profiles_dir", "smoke_dir", "leaderboard_dir", "no_render")


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str
    options: tuple[str, ...]
    defaults: dict = field(default_factory=dict)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, options: tuple[str, ...], **defaults):
    """Register `fn(args) -> exit code (None: 0)` as the command `name`, taking `options` (names of
    `options()`) with `defaults` of its own."""
    def add(fn: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = Command(name, fn, help, options, defaults)
        return fn
    return add


#: the mode flags of the CLI before it had commands: each names the command to use instead
OLD_FLAGS = {"--publish": "publish [STORE]", "--report": "report", "--export": "export FILE.csv",
             "--cost": "cost", "--profile": "profile", "--smoke": "smoke", "--list": "list",
             "--dry-run": "dry-run", "--smoke-tasks": "smoke --tasks K"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error the user can fix (argparse prints the usage too)."""
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def parser() -> Parser:
    top = Parser(prog="run_suite.py", description=__doc__.split("\n\n")[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    known = options()
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for name in cmd.options:
            flags, kw = known[name]
            p.add_argument(*flags, **({**kw, "default": cmd.defaults[name]} if name in cmd.defaults else kw))
    return top


def with_command(argv: list[str]) -> list[str]:
    """Options without a command (or nothing at all) are a sweep."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        return ["sweep", *argv]
    return argv


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command and its options; SystemExit(2) with one `error:` line for anything it does not
    take (an old mode flag names the command that replaced it)."""
    top = parser()
    for token in argv:
        flag = token.split("=", 1)[0]
        if flag in OLD_FLAGS:
            name = OLD_FLAGS[flag].split()[0]
            top.exit(2, f"error: {flag} is a command now: python run_suite.py {OLD_FLAGS[flag]} "
                        f"(see python run_suite.py {name} --help)\n")
    args, extra = top.parse_known_args(with_command(argv))
    if extra:
        flag = next((e.split("=", 1)[0] for e in extra if e.startswith("-")), None)
        known = options()
        takers = [c.name for c in COMMANDS.values() if any(flag in known[o][0] for o in c.options)]
        if takers:
            top.exit(2, f"error: {args.command} does not take {flag} ({', '.join(takers)} "
                        f"{'takes' if len(takers) == 1 else 'take'} it; see run_suite.py {args.command} --help)\n")
        top.exit(2, f"error: unrecognized arguments: {' '.join(extra)} (see run_suite.py {args.command} --help)\n")
    return args


# ------------------------------------------------------------------------------------ shared parts

def records_dir(args) -> Path:
    from leaderboard import layout
    from leaderboard.output import OutputError

    path = Path(args.records_dir) if args.records_dir else layout.RECORDS_DIR
    if path.exists() and not path.is_dir():
        raise OutputError(f"--records-dir {path} is a file, not a folder of published records "
                          "(<protocol>__<backbone>.jsonl files); give that folder")
    return path


def profiles_dir(args) -> Path:
    from leaderboard import layout
    return Path(args.profiles_dir) if args.profiles_dir else layout.PROFILES_DIR


def smoke_dir(args) -> Path:
    from leaderboard import layout
    return Path(args.smoke_dir) if args.smoke_dir else layout.SMOKE_DIR


def pages_dir(args) -> Path:
    from leaderboard import layout
    return Path(args.leaderboard_dir) if args.leaderboard_dir else layout.PAGES_DIR


def local_records(args) -> list[dict]:
    """The local store's runs, if the store exists (never created just to be read)."""
    from leaderboard.store import RunStore
    return RunStore(args.store).records() if Path(args.store).is_file() else []


def local_pages_dir(args) -> Path:
    """Where the local pages go: never the committed pages' folder."""
    from leaderboard import layout
    from leaderboard.output import OutputError, same_file

    path = Path(args.local_leaderboard_dir) if args.local_leaderboard_dir else layout.LOCAL_PAGES_DIR
    if same_file(path, pages_dir(args)):
        raise OutputError(f"--local-leaderboard-dir {path} is the committed pages' folder (--leaderboard-dir); "
                          "local pages never go there: give another folder")
    return path


def check_pages_dir(args, committed: bool = False, local: bool = True) -> None:
    """Refuse, before anything runs or is written, what would stop the pages from rendering: a
    pages folder this command would write and cannot (the local pages' with `local`, the committed
    pages' with `committed`), or a mistake in leaderboard/papers.yaml (the papers page reads it)."""
    from leaderboard.output import check_output_dir
    from leaderboard.papers import load_papers
    if getattr(args, "no_render", False):
        return
    load_papers()
    if local:
        check_output_dir(local_pages_dir(args), "--local-leaderboard-dir")
    if committed:
        check_output_dir(pages_dir(args), "--leaderboard-dir")


def run_costs(records: list[dict]) -> dict[str, dict]:
    """{key: run GFLOPs} of the records that predate their `run_gflops` field, counted now from
    their spec and cost (`protocols.work`); the pages take it for the records without the field."""
    from protocols.work import record_run_gflops

    return {r["key"]: c for r in records if "run_gflops" not in r and (c := record_run_gflops(r)) is not None}


def render_published(args) -> None:
    """The committed pages (`--leaderboard-dir`, default leaderboard/) from the published records
    alone: what `publish` and `report --published` write, and nothing else does."""
    from leaderboard.output import check_output_dir
    from leaderboard.records import load_measurements, load_published
    from leaderboard.render import render_all

    out = pages_dir(args)
    check_output_dir(out, "--leaderboard-dir")
    published = load_published(records_dir(args))
    res = render_all(published, (), out, profiles=load_measurements(profiles_dir(args)),
                     smoke=load_measurements(smoke_dir(args)), run_costs=run_costs(published),
                     reference=reference_records(records_dir(args), None, published, []))
    print(f"committed pages: {len(published)} published runs -> {len(res)} files in {out}/ "
          f"({len(res.changed)} changed, {len(res.removed)} removed)")


def render_local(args) -> None:
    """The local pages (`--local-leaderboard-dir`, default results/leaderboard/): the published
    records and the local store's runs not published yet, each of those marked (local)."""
    from leaderboard.output import check_output_dir
    from leaderboard.records import load_measurements, load_published
    from leaderboard.render import render_all

    out = local_pages_dir(args)
    check_output_dir(out, "--local-leaderboard-dir")
    published = load_published(records_dir(args))
    keys = {p["key"] for p in published}
    local = [r for r in local_records(args) if r["key"] not in keys and r.get("status", "ok") == "ok"]
    res = render_all(published, local, out, profiles=load_measurements(profiles_dir(args)),
                     smoke=load_measurements(smoke_dir(args)), run_costs=run_costs(published + local),
                     reference=reference_records(records_dir(args), args.store, published, local))
    print(f"local pages: {len(published)} published + {len(local)} local runs{' (marked local)' if local else ''} "
          f"-> {len(res)} files in {out}/ ({len(res.changed)} changed, {len(res.removed)} removed); the committed "
          f"pages in {pages_dir(args)}/ change only by `publish`")


def reference_records(records: Path, store: str | None, published: list[dict], local: list[dict]) -> list[dict]:
    """The published reference records (each checked against its published run) and, given the
    local `store`, those beside it not published yet (checked against its runs or the published ones)."""
    from leaderboard.reference_records import load_reference, local_reference_file, reference_dir

    out = load_reference([reference_dir(records)], published)
    if store is None:
        return out
    done = {r["key"] for r in out}
    mine = load_reference([local_reference_file(store)], [*published, *local], "published or local")
    return out + [r for r in mine if r["key"] not in done]


def sweep_request(args):
    from protocols.sweep import SweepRequest, parse_overrides

    methods = args.methods or ("none" if args.ablation else "all")
    return SweepRequest(
        protocols=split(args.protocols), methods=[] if methods == "none" else split(methods),
        backbones=args.backbones if args.backbones in ("default", "all") else split(args.backbones),
        ablations=[a for item in args.ablation for a in split(item)], seeds=args.seeds,
        overrides=parse_overrides(args.set), precision=args.precision)


def method_list(args) -> list[str]:
    return ["all"] if args.methods in (None, "all") else split(args.methods)


def log_dir(args) -> str:
    """Each run's log goes beside the store (absolute: workers may run elsewhere)."""
    return str(Path(args.store).expanduser().resolve().parent / "logs")


# ------------------------------------------------------------------------------------ sweep

@command("sweep", "run protocols x backbones x methods x seeds into the local store (a stored run is run again "
                  "when its code changed) and render the local pages (the default command)",
         WHAT + HOW + PAGES + ("rerun",))
def cmd_sweep(args) -> int:
    from leaderboard.records import load_published, reproduction
    from leaderboard.store import RunStore
    from protocols.sweep import keyed, pending, plan

    specs = keyed(plan(sweep_request(args)))
    options = check_sweep(args)  # everything typed is checked before the store is opened (or created)
    require_inputs([s for s, _ in specs], options)
    published = load_published(records_dir(args))  # read now: a bad file must not wait for the runs
    store = RunStore(args.store)
    stored = {r["key"]: r for r in store.records()}
    pend = pending(specs, stored.get, rerun=args.rerun)
    todo = pend.todo
    executor, executor_kw = executor_for(args, len(todo))
    options = replace(options, progress=executor == "local" and not args.quiet and sys.stderr.isatty())
    print(planned(len(specs), len(todo), args.store, executor_kw.get("workers", 1), pend.lines()), flush=True)
    if todo:
        store.check_writable()
    try:
        failed = execute(args, todo, store, options, executor, executor_kw)
    except Interrupted as e:
        print(f"\ninterrupted: {e.stored} of the {len(todo)} runs to do are stored in {args.store}"
              f"{f' ({e.failed} failed)' if e.failed else ''}; rerun the same command to resume "
              "(stored runs are skipped)", file=sys.stderr)
        return 130
    print_failures(failed, log_dir(args))
    if pend.rerun:
        print(f"ran {pend.rerun} stored run(s) again:")
        print("\n".join(pend.lines()))
    for line in reproduction([r for _, k in specs if (r := store.get(k)) is not None], published).lines():
        print(line)
    if not args.no_render:
        render_local(args)
    return 1 if failed else 0


def check_sweep(args):
    """The run options, once every option and output folder is checked (SweepError, ExecutorError,
    OutputError). One torch thread per run unless asked: a run's numbers can depend (rarely, in the
    last image) on the thread count, and the published records were made with one."""
    from leaderboard.output import check_output_dir
    from protocols.runner import RunOptions
    from protocols.sweep import check_options

    options = RunOptions(data_root=args.data_root, system_copy=args.system_copy, weights_dir=args.weights_dir,
                         device=args.device, eval_batch_size=args.eval_batch_size, quiet=not args.verbose,
                         download=args.download, allow_download=args.allow_download,
                         threads=args.threads, loader_workers=args.loader_workers, log_dir=log_dir(args))
    check_options(options, args.executor, args.workers, gpus_per_run=args.gpus_per_run,
                  timeout_min=args.slurm_timeout_min)
    check_pages_dir(args)
    if args.executor == "slurm":
        check_output_dir(args.slurm_folder, "--slurm-folder")
    return replace(options, threads=args.threads or 1)


def require_inputs(specs, options) -> None:
    """Refuse to start while any data set or checkpoint the planned runs read is missing or
    damaged (NotReadyError naming every one of them and the fetch command); say so when the data
    is the system copy (only ever used when no --data-root was given)."""
    from protocols import prepare
    from protocols.errors import NotReadyError

    states = prepare.inspect(prepare.requirements_for_runs(specs, options))
    problems = [s for s in states if not s.ok]
    if problems:
        raise NotReadyError(prepare.format_problems(problems))
    for s in prepare.from_system_copy(states):
        print(f"{s.requirement.title}: the system copy in {s.path} (no --data-root given)")


def executor_for(args, n_todo: int) -> tuple[str, dict]:
    """The executor that runs `n_todo` runs and its keywords: local runs go to worker processes
    when more than one fits (`--workers`, else as many as the CPUs hold)."""
    from protocols.executors import default_workers

    if args.executor == "local":
        workers = args.workers or default_workers(n_todo, args.threads or 1)
        return ("processes", {"workers": workers, "plugins": args.plugin}) if workers > 1 else ("local", {})
    if args.executor == "ray":
        return "ray", {"plugins": args.plugin, "address": args.address, "gpus_per_run": args.gpus_per_run}
    return "slurm", {"plugins": args.plugin, "folder": args.slurm_folder, "partition": args.slurm_partition,
                     "timeout_min": args.slurm_timeout_min, "gpus_per_run": args.gpus_per_run}


def planned(n_specs: int, n_todo: int, store: str, workers: int, why: list[str] = ()) -> str:
    """The sweep's first line, and a line per reason a stored run runs again (`why`:
    `protocols.sweep.Pending.lines`)."""
    return "\n".join([f"{n_specs:,} runs planned, {n_specs - n_todo:,} already in {store}, {n_todo:,} to run"
                      + (f" in {workers} worker processes" if workers > 1 else ""), *why])


class Interrupted(Exception):
    """Ctrl-C during a sweep, with how many runs were stored by then."""

    def __init__(self, stored: int, failed: int):
        super().__init__(f"{stored} stored, {failed} failed")
        self.stored, self.failed = stored, failed


def execute(args, todo, store, options, executor: str, executor_kw: dict) -> list[dict]:
    """Run `todo`, one line per run as it ends; the records of the runs that failed."""
    from tqdm import tqdm

    from protocols.sweep import execute_pending

    stored, failed = 0, []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=args.quiet or None)
    try:
        for spec, record in execute_pending(todo, store, options, executor=executor, argv=args.argv,
                                            **executor_kw):
            bar.update(1)
            if record["status"] == "failed":
                failed.append(record)
            else:
                stored += 1
            bar.write(run_line(spec, record, log_dir(args)))
    except KeyboardInterrupt:
        raise Interrupted(stored, len(failed)) from None
    finally:
        bar.close()
    return failed


def run_line(spec, record: dict, logs: str) -> str:
    """One run's line; a failed run's error is appended to its log, which the line names."""
    from protocols.runner import log_path

    head = f"{record['protocol']:<14} {spec.backbone:<7} {spec.display_label:<14} seed {spec.seed}:"
    if record["status"] == "failed":
        log = log_path(logs, record["key"], spec)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a", encoding="utf-8") as fh:
            fh.write(f"\nFAILED: {record['error']}\n{record['traceback']}")
        return f"{head} FAILED: {record['error'].splitlines()[0][:160]} (log: {log})"
    m = record["metrics"]
    return (f"{head} FAA {m['faa']:6.2f}  CAA {m['caa']:6.2f}  FFM {m['ffm']:5.2f}  "
            f"({record['timings']['total_s']:.1f} s)")


def print_failures(failed: list[dict], logs: str) -> None:
    if not failed:
        return
    print(f"{len(failed)} run(s) failed; they are stored as failed (never in a table) and the "
          f"next sweep retries them. Logs: {logs}/")
    for r in failed:
        print(f"  {r['protocol']} {r['backbone']} {r['label']} seed {r['seed']}: {r['error'].splitlines()[0][:200]}")


# ------------------------------------------------------------------------------------ dry run

@command("dry-run", "print the runs a sweep would do and their expected wall time on this device (from its "
                    "profile records, else measured now)",
         WHAT + ("store", "profiles_dir", "data_root", "weights_dir", "download", "allow_download", "device",
                 "eval_batch_size", "threads", "workers", "profile_batch", "plugin", "quiet", "rerun"))
def cmd_dry_run(args) -> int:
    from leaderboard.records import load_measurements
    from leaderboard.store import RunStore
    from protocols.devices import device_name, resolve_device
    from protocols.estimate import estimate, format_estimates, human, total_seconds
    from protocols.executors import default_workers
    from protocols.runner import RunOptions
    from protocols.sweep import check_options, configurations, fresh_runs, seeds_to_run

    from protocols import prepare

    # per configuration, never per run: the time and memory of a dry run do not grow with --seeds
    request = sweep_request(args)
    configs = configurations(request)
    options = RunOptions(data_root=args.data_root, system_copy=args.system_copy, weights_dir=args.weights_dir,
                         device=args.device, eval_batch_size=args.eval_batch_size, threads=args.threads,
                         download=args.download,
                         allow_download=args.allow_download)
    check_options(options, workers=args.workers)
    missing = prepare.check(prepare.requirements_for_runs(configs, options))
    if missing:  # said first: the estimate needs no data, but the sweep would refuse to start
        print(prepare.format_problems(missing) + "\n", flush=True)
    stored = fresh_runs(RunStore(args.store).records(), rerun=args.rerun) if Path(args.store).is_file() else {}
    todo = [(config, n) for config, n in seeds_to_run(configs, request.seeds, stored) if n]
    n_todo = sum(n for _, n in todo)
    workers = args.workers or default_workers(n_todo, args.threads or 1)
    print(planned(len(configs) * request.seeds, n_todo, args.store, workers), flush=True)
    name = device_name(resolve_device(args.device))
    profiles = [r for r in load_measurements(profiles_dir(args)) if r.get("device") == name]
    est = estimate([c for c, _ in todo], profiles, device=args.device, batch_size=args.profile_batch,
                   eval_batch_size=args.eval_batch_size, progress=None if args.quiet else print,
                   runs=[n for _, n in todo])
    print(format_estimates(est, name, [r for r in profiles if r.get("kind") == "loader"]))
    if workers > 1:  # profiled at one thread per run: runs spread over the worker processes
        print(f"with {workers} worker processes of one thread each: about "
              f"{human(total_seconds(est) / workers)} if the cores are free")
    return 2 if missing else 0


# ------------------------------------------------------------------------------------ inputs

INPUTS = ("protocols", "backbones", "data_root", "weights_dir")


@command("fetch", "download what the protocols and backbones need and is not there yet (data sets, "
                  "checkpoints), each verified against its checksum and put in place atomically",
         INPUTS + ("mirror", "quiet"))
def cmd_fetch(args) -> None:
    from protocols import prepare

    reqs = prepare.requirements(split(args.protocols), backbones_option(args), args.data_root, args.weights_dir)
    written = prepare.fetch(reqs, mirror=args.mirror, progress=not args.quiet)
    print(f"fetch: {len(written)} file(s) or folder(s) written; every piece is in place")


@command("check", "list every data set and checkpoint the protocols and backbones need, with its state "
                  "(exit 2 if any is missing or damaged)", INPUTS + ("verify",))
def cmd_check(args) -> int:
    from protocols import prepare

    reqs = prepare.requirements(split(args.protocols), backbones_option(args), args.data_root, args.weights_dir,
                                system_copy=args.system_copy)
    states = prepare.inspect(reqs, verify=args.verify)
    print(prepare.format_report(states))
    return 0 if all(s.ok for s in states) else 2


def backbones_option(args) -> str | list[str]:
    return args.backbones if args.backbones in ("default", "all") else split(args.backbones)


# ------------------------------------------------------------------------------------ results

@command("publish", "add the complete runs of the local store (or of STORE, e.g. one made on a cluster) and their "
                    "reference records to the published records, then render the committed pages (and the local "
                    "ones)", ("source",) + PAGES)
def cmd_publish(args) -> None:
    from leaderboard.output import check_output_dir
    from leaderboard.records import load_published, publish
    from leaderboard.reference_records import (local_reference_file, plan_reference, publish_reference,
                                               read_reference, reference_dir)
    from leaderboard.store import RunStore, StoreError

    path = args.source or args.store
    flag = "publish" if args.source else "--store"  # how the user named it
    if Path(path).is_dir():
        raise StoreError(f"{flag} {path} is a folder; give the run store file (a .sqlite) to publish")
    if not Path(path).is_file():
        raise StoreError(f"{flag} {path}: no run store there, nothing to publish")
    check_output_dir(records_dir(args), "--records-dir")  # every output is checked before anything is written
    check_pages_dir(args, committed=True)
    runs = RunStore(path, flag=flag).records()
    # the store's reference records (`reference`) go with its runs: checked first, all or nothing
    ref_file, ref_dir = local_reference_file(path), reference_dir(records_dir(args))
    pending = [r for r, _ in read_reference(ref_file)] if ref_file.is_file() else []
    plan_reference(pending, ref_dir, [*load_published(records_dir(args)),
                                      *(r for r in runs if r.get("status", "ok") == "ok")], str(ref_file))
    res = publish(runs, records_dir(args), source=str(path))
    print(f"published {len(res.added)} new run(s) to {records_dir(args)} "
          f"({res.already} already published, {res.not_ok} failed run(s) left out)")
    for f in res.files:
        print(f"  {f}")
    if pending:
        ref = publish_reference(pending, ref_dir, load_published(records_dir(args)), str(ref_file))
        print(f"published {len(ref.added)} new reference record(s) to {ref_dir} ({ref.already} already published)")
        for f in ref.files:
            print(f"  {f}")
    if not args.no_render:
        render_published(args)
        render_local(args)


@command("report", "render the local pages from the published records and the local store's runs not published "
                   "(if it exists), or with --published the committed pages from the published records alone; "
                   "runs nothing",
         ("store", "records_dir", "profiles_dir", "smoke_dir", "leaderboard_dir", "local_leaderboard_dir", "published"))
def cmd_report(args) -> None:
    if args.published:
        render_published(args)
    else:
        render_local(args)


@command("export", "write one CSV row per run: the published records and the local store's runs",
         ("csv", "store", "records_dir"))
def cmd_export(args) -> None:
    from leaderboard.export import export_csv
    from leaderboard.records import load_published, merge

    records = merge(load_published(records_dir(args)), local_records(args))
    df = export_csv(records, args.csv, protect=[args.store])
    print(f"exported {len(df)} runs ({int(df['published'].sum())} published) to {args.csv}")


# ------------------------------------------------------------------------------------ measurements

@command("cost", "print parameter / pass / GFLOP counts per protocol x backbone x method",
         ("protocols", "backbones", "methods", "set", "weights_dir", "random_init", "allow_download", "device",
          "format", "plugin"))
def cmd_cost(args) -> None:
    from tabulate import tabulate

    from protocols.cost_table import cost_rows
    from protocols.devices import check_device
    from protocols.sweep import parse_overrides

    check_device(args.device)
    rows = cost_rows(split(args.protocols), args.backbones, method_list(args), parse_overrides(args.set),
                     weights_dir=args.weights_dir, random_init=args.random_init,
                     allow_download=args.allow_download, device=args.device)
    if args.format == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        print(tabulate(rows, headers="keys", tablefmt="github"))


@command("profile", "measure training / evaluation images/s, FLOPs, the fraction of this device's matmul peak "
                    "and the loader's images/s per method at the protocols' real shape (random weights, no "
                    "data); kept in leaderboard/profiles/ and shown on the cost page",
         ("protocols", "backbones", "methods", "set", "precision", "device", "profile_batch", "eval_batch_size",
          "threads", "quiet", "plugin") + COMMITTED_PAGES)
def cmd_profile(args) -> None:
    from leaderboard.records import add_measurements
    from protocols.devices import check_device, device_slug
    from protocols.profile import format_profile, profile
    from protocols.sweep import parse_overrides, resolve_backbones

    check_device(args.device)
    check_pages_dir(args, committed=True, local=False)
    records = []
    for pname in split(args.protocols):
        records += profile([pname], resolve_backbones(pname, args.backbones), method_list(args),
                           device=args.device, precision=args.precision, batch_size=args.profile_batch,
                           eval_batch_size=args.eval_batch_size, threads=args.threads,
                           overrides=parse_overrides(args.set), progress=None if args.quiet else print)
    if records:
        path = add_measurements(records, profiles_dir(args) / f"{device_slug(records[0]['device'])}.jsonl")
        print(format_profile(records))
        print(f"{len(records)} profile records added to {path}")
    if not args.no_render:  # profile records are published as they are measured: the committed cost page shows them
        render_published(args)


@command("smoke", "the real-shape dry run: every method through every task of the real protocols on ViT-B/16 "
                  "with random weights and synthetic files in the real formats, epochs lowered to 1 (hours on "
                  "a CPU); its records in leaderboard/smoke/, its runs in their own store",
         ("protocols", "methods", "tasks", "device", "threads", "eval_batch_size", "verbose", "plugin", "store",
          "batch_sizes") + COMMITTED_PAGES, protocols="real", store="results/smoke.sqlite", batch_sizes=None)
def cmd_smoke(args) -> int:
    """Run the dry run, keep one smoke record per run and re-render; exit 1 if a run did not complete."""
    from leaderboard.records import add_measurements
    from leaderboard.reference_records import add_reference, local_reference_file
    from leaderboard.store import RunStore
    from protocols.devices import check_device, device_slug
    from protocols.record import REAL_PROTOCOLS
    from protocols.smoke import run_smoke

    check_device(args.device)
    check_pages_dir(args, committed=True, local=False)
    protocols = list(REAL_PROTOCOLS) if args.protocols == "real" else split(args.protocols)
    sizes = batch_sizes(args.batch_sizes) if args.batch_sizes else ()
    store = RunStore(args.store)
    store.check_writable()
    done = []
    for smoke in run_smoke(protocols, method_list(args), store=store, tasks=args.tasks, device=args.device,
                           threads=args.threads or 1, eval_batch_size=args.eval_batch_size,
                           quiet=not args.verbose, reference_batch_sizes=sizes):
        print(smoke.line(), flush=True)
        if smoke.reference is not None:  # beside the smoke store's runs, never published
            print(reference_line(smoke.reference), flush=True)
            add_reference([smoke.reference], local_reference_file(args.store))
        add_measurements([smoke.smoke], smoke_dir(args) / f"{device_slug(smoke.smoke['device'])}.jsonl")
        done.append(smoke)
    complete = sum(s.smoke["complete"] for s in done)
    print(f"smoke: {complete}/{len(done)} runs complete in {sum(s.smoke['wall_s'] for s in done):.0f} s; "
          f"records in {args.store}, smoke records in {smoke_dir(args)}/")
    if not args.no_render:  # smoke records are published as they are made: the committed cost page shows them
        render_published(args)
    return 0 if complete == len(done) else 1


@command("list", "list the methods, protocols (with their ablations) and backbones", ("plugin",))
def cmd_list(args) -> None:
    from protocols.catalog import listing
    print(listing())


# ------------------------------------------------------------------------------------ reference behaviours

@command("reference", "train runs again and, after every task, evaluate each trained model as its method's public "
                      "code evaluates (its reference modes: batch vote, prefix mixing) at several test batch sizes; "
                      "the reference records go beside the store (<store>.reference.jsonl), `publish` publishes "
                      "them with the runs, the pages show them (reference-behaviours.md)",
         WHAT + HOW + PAGES + ("batch_sizes",))
def cmd_reference(args) -> int:
    """Methods default to every method with reference modes; a run whose key already has a reference
    record (published, or beside the store) is not run again; a re-run whose per-sample matrix
    differs from its key's published or stored record is kept nowhere (exit 1)."""
    from leaderboard.records import load_published, reproduction
    from leaderboard.reference_records import (ReferenceStore, load_reference, local_reference_file, read_reference,
                                               reference_dir)
    from leaderboard.store import RunStore
    from protocols.reference_eval import affected_methods, check_methods
    from protocols.sweep import keyed, plan

    request = sweep_request(args)
    if list(request.methods) == ["all"]:
        request = replace(request, methods=affected_methods())
    specs = keyed(plan(request))
    check_methods([s.method for s, _ in specs])
    options = replace(check_sweep(args), reference_batch_sizes=batch_sizes(args.batch_sizes))
    require_inputs([s for s, _ in specs], options)
    published = load_published(records_dir(args))
    done = {r["key"] for r in load_reference([reference_dir(records_dir(args))], published)}
    mine = local_reference_file(args.store)
    done |= {r["key"] for r, _ in read_reference(mine)} if mine.is_file() else set()
    store = RunStore(args.store)
    todo = [s for s, k in specs if k not in done]
    executor, executor_kw = executor_for(args, len(todo))
    options = replace(options, progress=executor == "local" and not args.quiet and sys.stderr.isatty())
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already have reference records, {len(todo)} to "
          f"run" + (f" in {executor_kw['workers']} worker processes" if executor_kw.get("workers", 1) > 1 else ""),
          flush=True)
    if todo:
        store.check_writable()
    keeper = ReferenceStore(store, mine, {r["key"]: r for r in published})
    try:
        failed = execute(args, todo, keeper, options, executor, executor_kw)
    except Interrupted as e:
        print(f"\ninterrupted: {len(keeper.added)} reference record(s) kept in {mine}; rerun the same command "
              "to resume", file=sys.stderr)
        return 130
    print_failures(failed, log_dir(args))
    for ref in keeper.added:
        print(reference_line(ref))
    for old, new in keeper.refused:
        print(f"not kept: {new['label']} seed {new['seed']} (key {new['key'][:12]}) did not reproduce its recorded "
              f"run: FAA {old['metrics']['faa']:.2f} recorded, {new['metrics']['faa']:.2f} here; its reference "
              "record would not describe the recorded model")
    rerun = [r for r in (store.get(ref["key"]) for ref in keeper.added) if r is not None]
    for line in reproduction(rerun + [n for _, n in keeper.refused], published).lines():
        print(line)
    print(f"{len(keeper.added)} reference record(s) added to {mine}; `python run_suite.py publish` publishes them "
          "with their runs")
    if not args.no_render:
        render_local(args)
    return 1 if failed or keeper.refused else 0


def batch_sizes(value: str) -> tuple[int, ...]:
    """`--batch-sizes 16,64` -> (16, 64); SweepError for anything else."""
    from protocols.errors import SweepError
    from protocols.reference_eval import check_batch_sizes

    try:
        sizes = tuple(int(b) for b in split(value))
    except ValueError:
        raise SweepError(f"--batch-sizes takes a comma list of test batch sizes, e.g. 16,64; got {value!r}") from None
    if not sizes:
        raise SweepError("--batch-sizes takes a comma list of test batch sizes, e.g. 16,64; got none")
    check_batch_sizes(sizes)
    return sizes


def reference_line(ref: dict) -> str:
    """One line per re-evaluated run: its FAA per sample, then under each mode set by batch size."""
    from protocols.reference_record import mode_set_name

    by_set: dict[str, list[str]] = {}
    for ev in ref["evaluations"]:
        by_set.setdefault(mode_set_name(ev["modes"]), []).append(f"@{ev['batch_size']} {ev['metrics']['faa']:.2f}")
    return (f"{ref['protocol']:<14} {ref['backbone']:<7} {ref['label']:<14} seed {ref['seed']}: FAA "
            + " | ".join(f"{name} {' '.join(cells)}" for name, cells in by_set.items())
            + f"  (+{ref['timings']['reference_s']:.0f} s)")


# ------------------------------------------------------------------------------------ main

def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that become one `error:` line and exit 2: the protocols' (bad inputs, data,
    weights, plugins, records) and the leaderboard's (conflicting records, output paths, stores)."""
    from leaderboard.output import OutputError
    from leaderboard.papers import PapersError
    from leaderboard.records import RecordConflict
    from leaderboard.store import StoreError
    from protocols.errors import USER_ERRORS

    return (*USER_ERRORS, RecordConflict, OutputError, StoreError, PapersError)


def main(argv: list[str] | None = None) -> int:
    quiet_imports()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv  # what a sweep stamps into its records
    if hasattr(args, "data_root"):  # a root the user named (flag or environment) is never replaced
        named = args.data_root or os.environ.get("PROMPTCL_DATA_ROOT")
        args.system_copy = not named
        args.data_root = named or "data"
    from protocols.catalog import load_plugins

    errors = user_errors()
    try:
        load_plugins(getattr(args, "plugin", []))
        return COMMANDS[args.command].run(args) or 0
    except errors as e:
        if os.environ.get("PROMPTCL_DEBUG"):
            raise
        # one line, whatever the message's layout (lists of paths, YAML's pointers, conflicts)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a sweep says this itself; the other long commands (smoke, profile) here
        print("interrupted: every run, smoke or profile record that finished is kept; rerun the command "
              "for the rest", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
