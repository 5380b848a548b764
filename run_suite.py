#!/usr/bin/env python
"""promptcl: run protocols x backbones x methods x seeds, store every run, write the leaderboard.

    python run_suite.py --methods all --seeds 5            # the embedded default (fmnist-5t, tiny)
    python run_suite.py --methods all --ablation all --seeds 5   # ... and its ablations (make suite)
    python run_suite.py --list                             # methods, protocols, backbones
    python run_suite.py --protocols cifar100-10t --backbones sup21k --methods l2p,smope --seeds 5
    python run_suite.py --ablation smope --seeds 5         # the SMoPE ablation table only
    python run_suite.py --publish                          # local runs -> leaderboard/records/
    python run_suite.py --report                           # re-render the pages, run nothing
    python run_suite.py --export runs.csv                  # published + local runs, one row each
    python run_suite.py --cost --protocols cifar100-10t --backbones sup21k --random-init
    python run_suite.py --profile --protocols cifar100-10t --backbones sup21k   # images/s here
    python run_suite.py --dry-run --protocols all --backbones all --seeds 5    # how long?
    python run_suite.py --smoke --smoke-tasks 2 --protocols cifar100-10t      # the real path, quickly

A sweep skips runs whose key is already in the local store; a run is stored only once complete,
so an interrupted sweep resumes where it stopped. Runs whose key is published are compared with
the published record (the reproduction line). The pages are rendered from the published records
plus the local runs not published yet; publishing is explicit.

Exit codes: 0 done; 1 the sweep finished but some runs failed (stored as failed, listed, retried
by the next sweep); 2 an input the user can fix (one `error:` line, nothing run or changed); 130
interrupted (Ctrl-C; rerun to resume).

This file parses, dispatches and prints; the work is in protocols/ and leaderboard/.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path


#: warnings that say nothing to a user of the suite: Avalanche imports qpsolvers, which has no
#: solver here (only GEM / A-GEM need one); an Avalanche evaluator without loggers (quiet runs)
_SILENCED = ("no QP solver found", "No loggers specified")


def _quiet_imports() -> None:
    """Silence `_SILENCED` here and in every worker process a sweep starts (local pool, local
    Ray): a spawned interpreter reads PYTHONWARNINGS before its first import."""
    for message in _SILENCED:
        warnings.filterwarnings("ignore", message=re.escape(message), category=UserWarning)
    given = [w for w in os.environ.get("PYTHONWARNINGS", "").split(",") if w]
    ours = [f"ignore:{message}:UserWarning" for message in _SILENCED]
    os.environ["PYTHONWARNINGS"] = ",".join(given + [w for w in ours if w not in given])


def _split(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line, as every other error the user can fix (argparse prints the usage too)."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = _Parser(
        prog="run_suite.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    what = ap.add_argument_group("what to run")
    what.add_argument("--methods", default=None,
                      help="'all' (default, unless --ablation is given), 'none', or a comma list (see --list)")
    what.add_argument("--ablation", action="append", default=[], metavar="NAME",
                      help="also run the protocol's ablation NAME ('all': every one), its own table (repeatable)")
    what.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    what.add_argument("--protocols", default=None,
                      help="comma list of protocol names or YAML paths, or 'all' (default fmnist-5t; "
                           "with --smoke every real protocol)")
    what.add_argument("--backbones", default="default",
                      help="comma list, 'default' (each protocol's first) or 'all' (each protocol's list)")
    what.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                      help="override a hyperparameter, e.g. --set smope.top_k=3 (repeatable; "
                           "such runs get their own labelled rows)")
    what.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                      help="bf16: autocast of the minibatch forward (for GPUs; part of the run key)")
    where = ap.add_argument_group("where things are")
    where.add_argument("--data-root", default=os.environ.get("PROMPTCL_DATA_ROOT", "data"))
    where.add_argument("--weights-dir", default="pretrained", help="folder of the ViT-B/16 checkpoints")
    where.add_argument("--store", default=None,
                       help="the local SQLite run store (default results/suite.sqlite; with --smoke "
                            "results/smoke.sqlite, never the results)")
    where.add_argument("--records-dir", default=None,
                       help="published records (default: leaderboard/records/ of the suite)")
    where.add_argument("--leaderboard-dir", default="leaderboard", help="where the pages go")
    how = ap.add_argument_group("how to run")
    how.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0, ...")
    how.add_argument("--eval-batch-size", type=int, default=256)
    how.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads per run (default 1: a run's numbers can depend on "
                          "the thread count, rarely; records say which)")
    how.add_argument("--plugin", action="append", default=[], metavar="FILE.py|module",
                     help="import a method plugin (repeatable); the only code the suite runs that "
                          "is not its own")
    how.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST")
    how.add_argument("--allow-download", action="store_true",
                     help="let timm fetch sup21k / sup1k weights from its hub if no file is found")
    how.add_argument("--quiet", action="store_true", help="no progress bars, only result lines")
    how.add_argument("--verbose", action="store_true", help="Avalanche's per-experience logs too")
    how.add_argument("--no-render", action="store_true", help="do not rewrite the leaderboard")
    how.add_argument("--workers", type=int, default=None,
                     help="local runs in N worker processes of --threads (default 1) torch threads "
                          "each (default: as many as the CPUs hold; 1 = in this process)")
    how.add_argument("--loader-workers", type=int, default=None,
                     help="DataLoader worker processes per run (default: 0 on CPU, up to 8 on CUDA); "
                          "results never depend on it")
    how.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                     help="where runs execute; only this driver writes the store")
    how.add_argument("--gpus-per-run", type=float, default=None,
                     help="GPUs a Ray task or Slurm job asks for (default: 1 unless --device cpu)")
    how.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    how.add_argument("--slurm-partition", default=None)
    how.add_argument("--slurm-timeout-min", type=int, default=720)
    how.add_argument("--slurm-folder", default="results/slurm")
    cmd = ap.add_argument_group("other commands (each runs instead of a sweep)")
    cmd.add_argument("--list", action="store_true", help="list methods, protocols and backbones")
    cmd.add_argument("--dry-run", action="store_true",
                     help="print the runs a sweep would do and their expected wall time on this "
                          "device (from its profile records, else measured now)")
    cmd.add_argument("--report", action="store_true",
                     help="re-render the pages from the published records (and the local store if "
                          "it exists); runs nothing")
    cmd.add_argument("--publish", nargs="?", const="", default=None, metavar="STORE",
                     help="add the complete runs of the local store (or of STORE, e.g. one made on "
                          "a cluster) to the published records, then re-render")
    cmd.add_argument("--export", metavar="FILE.csv",
                     help="write one CSV row per run: published records and the local store's runs")
    cmd.add_argument("--smoke", action="store_true",
                     help="the real-shape dry run: every method through every task of the real "
                          "protocols on ViT-B/16 with random weights and synthetic files in the real "
                          "formats, epochs lowered to 1 (hours on a CPU); kept in "
                          "leaderboard/smoke/, its runs in their own store")
    cmd.add_argument("--smoke-tasks", type=int, default=None, metavar="K",
                     help="with --smoke: only the first K tasks of each protocol (same stream, "
                          "head and hyperparameters; the reduced form CI runs)")
    cmd.add_argument("--cost", action="store_true", help="print parameter / pass / GFLOP counts")
    cmd.add_argument("--profile", action="store_true",
                     help="measure training / evaluation images/s, FLOPs, the fraction of this "
                          "device's matmul peak and the loader's images/s per method at the "
                          "protocols' real shape (random weights, no data); kept in "
                          "leaderboard/profiles/ and shown on the cost page")
    cmd.add_argument("--profile-batch", type=int, default=None, metavar="N",
                     help="with --profile / --dry-run: measure at batch N instead of each method's "
                          "own (the record says so; for slow CPUs)")
    cmd.add_argument("--random-init", action="store_true",
                     help="with --cost: the backbone with random weights (nothing read or fetched)")
    cmd.add_argument("--format", choices=["table", "json"], default="table", help="--cost output")
    args = ap.parse_args(argv)
    if args.methods is None:
        args.methods = "none" if args.ablation else "all"
    if args.protocols is None:
        args.protocols = "real" if args.smoke else "fmnist-5t"
    if args.store is None:
        args.store = "results/smoke.sqlite" if args.smoke else "results/suite.sqlite"
    return args


def _records_dir(args) -> Path:
    from leaderboard.layout import RECORDS_DIR
    from leaderboard.output import OutputError

    path = Path(args.records_dir) if args.records_dir else RECORDS_DIR
    if path.exists() and not path.is_dir():
        raise OutputError(f"--records-dir {path} is a file, not a folder of published records "
                          "(<protocol>__<backbone>.jsonl files); give that folder")
    return path


def _local_records(args) -> list[dict]:
    """The local store's runs, if the store exists (never created just to be read)."""
    from leaderboard.store import RunStore
    return RunStore(args.store).records() if Path(args.store).is_file() else []


def render_leaderboard(args) -> None:
    from leaderboard.layout import PROFILES_DIR, SMOKE_DIR
    from leaderboard.output import check_output_dir
    from leaderboard.records import load_measurements, load_published
    from leaderboard.render import render_all

    check_output_dir(args.leaderboard_dir, "--leaderboard-dir")
    published = load_published(_records_dir(args))
    local = [r for r in _local_records(args) if r["key"] not in {p["key"] for p in published}]
    res = render_all(published, local, args.leaderboard_dir, profiles=load_measurements(PROFILES_DIR),
                     smoke=load_measurements(SMOKE_DIR))
    print(f"leaderboard: {len(published)} published + {len(local)} local runs -> {len(res)} files in "
          f"{args.leaderboard_dir}/ ({len(res.changed)} changed, {len(res.removed)} removed)")


def cmd_publish(args) -> None:
    from leaderboard.output import check_output_dir
    from leaderboard.records import publish
    from leaderboard.store import RunStore, StoreError

    path = args.publish or args.store
    flag = "--publish" if args.publish else "--store"
    if Path(path).is_dir():
        raise StoreError(f"{flag} {path} is a folder; give the run store file (a .sqlite) to publish")
    if not Path(path).is_file():
        raise StoreError(f"{flag} {path}: no run store there, nothing to publish")
    # every output is checked before anything is written
    check_output_dir(_records_dir(args), "--records-dir")
    if not args.no_render:
        check_output_dir(args.leaderboard_dir, "--leaderboard-dir")
    res = publish(RunStore(path, flag=flag).records(), _records_dir(args), source=str(path))
    print(f"published {len(res.added)} new run(s) to {_records_dir(args)} "
          f"({res.already} already published, {res.not_ok} failed run(s) left out)")
    for f in res.files:
        print(f"  {f}")


def cmd_export(args) -> None:
    from leaderboard.export import export_csv
    from leaderboard.records import load_published, merge

    records = merge(load_published(_records_dir(args)), _local_records(args))
    df = export_csv(records, args.export, protect=[args.store])
    print(f"exported {len(df)} runs ({int(df['published'].sum())} published) to {args.export}")


def cmd_sweep(args, argv: list[str]) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from leaderboard.output import check_output_dir
    from leaderboard.records import load_published, reproduction
    from leaderboard.store import RunStore
    from protocols.executors import default_workers
    from protocols.runner import RunOptions, log_path
    from protocols.sweep import (SweepRequest, check_options, execute_pending, keyed, parse_overrides,
                                 plan)

    request = SweepRequest(
        protocols=_split(args.protocols), backbones=args.backbones if args.backbones in ("default", "all")
        else _split(args.backbones), methods=[] if args.methods == "none" else _split(args.methods),
        ablations=[a for item in args.ablation for a in _split(item)], seeds=args.seeds,
        overrides=parse_overrides(args.set), precision=args.precision)
    specs = keyed(plan(request))
    log_dir = str(Path(args.store).expanduser().resolve().parent / "logs")  # workers may run elsewhere
    options = RunOptions(data_root=args.data_root, weights_dir=args.weights_dir, device=args.device,
                         eval_batch_size=args.eval_batch_size, quiet=not args.verbose,
                         download=args.download, allow_download=args.allow_download,
                         threads=args.threads, loader_workers=args.loader_workers, log_dir=log_dir)
    # everything the user typed is checked before the store is opened (or created) and any run starts
    check_options(options, args.executor, args.workers, gpus_per_run=args.gpus_per_run,
                  timeout_min=args.slurm_timeout_min)
    if not args.no_render and not args.dry_run:
        check_output_dir(args.leaderboard_dir, "--leaderboard-dir")
    if args.executor == "slurm":
        check_output_dir(args.slurm_folder, "--slurm-folder")
    published = load_published(_records_dir(args))  # read now: a bad file must not wait for the runs
    store = RunStore(args.store)
    todo = [s for s, k in specs if not store.has(k)]
    workers = args.workers or default_workers(len(todo), args.threads or 1)
    executor = "processes" if args.executor == "local" and workers > 1 else args.executor
    # one torch thread per run unless asked: a run's numbers can depend (rarely, in the last
    # image) on the thread count, and the published records were made with one
    options = replace(options, threads=args.threads or 1,
                      progress=executor == "local" and not args.quiet and sys.stderr.isatty())
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already in {args.store}, "
          f"{len(todo)} to run" + (f" in {workers} worker processes" if executor == "processes" else ""),
          flush=True)
    if args.dry_run:
        print(dry_run(args, todo, workers if executor == "processes" else 1))
        return 0
    if todo:
        store.check_writable()
    kw: dict = {"plugins": args.plugin} if executor != "local" else {}
    if executor == "processes":
        kw["workers"] = workers
    elif executor == "ray":
        kw.update(address=args.address, gpus_per_run=args.gpus_per_run)
    elif executor == "slurm":
        kw.update(folder=args.slurm_folder, partition=args.slurm_partition,
                  timeout_min=args.slurm_timeout_min, gpus_per_run=args.gpus_per_run)
    stored, failed = 0, []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=args.quiet or None)
    try:
        for spec, record in execute_pending(todo, store, options, executor=executor, argv=argv, **kw):
            bar.update(1)
            head = f"{record['protocol']:<14} {spec.backbone:<7} {spec.display_label:<14} seed {spec.seed}:"
            if record["status"] == "failed":
                failed.append(record)
                log = log_path(log_dir, record["key"], spec)
                log.parent.mkdir(parents=True, exist_ok=True)
                with log.open("a", encoding="utf-8") as fh:
                    fh.write(f"\nFAILED: {record['error']}\n{record['traceback']}")
                bar.write(f"{head} FAILED: {record['error'].splitlines()[0][:160]} (log: {log})")
                continue
            stored += 1
            m = record["metrics"]
            bar.write(f"{head} FAA {m['faa']:6.2f}  CAA {m['caa']:6.2f}  FFM {m['ffm']:5.2f}  "
                      f"({record['timings']['total_s']:.1f} s)")
    except KeyboardInterrupt:
        bar.close()
        print(f"\ninterrupted: {stored} of the {len(todo)} runs to do are stored in {args.store}"
              f"{f' ({len(failed)} failed)' if failed else ''}; rerun the same command to resume "
              "(stored runs are skipped)", file=sys.stderr)
        return 130
    bar.close()
    if failed:
        print(f"{len(failed)} run(s) failed; they are stored as failed (never in a table) and the "
              f"next sweep retries them. Logs: {log_dir}/")
        for r in failed:
            print(f"  {r['protocol']} {r['backbone']} {r['label']} seed {r['seed']}: {r['error'].splitlines()[0][:200]}")
    rep = reproduction([r for _, k in specs if (r := store.get(k)) is not None], published)
    for line in rep.lines():
        print(line)
    if not args.no_render:
        render_leaderboard(args)
    return 1 if failed else 0


def _this_device_measurements(args) -> tuple[str, list[dict]]:
    """This device's name and its stored profile / loader records."""
    from leaderboard.layout import PROFILES_DIR
    from leaderboard.records import load_measurements
    from protocols.devices import device_name, resolve_device

    name = device_name(resolve_device(args.device))
    return name, [r for r in load_measurements(PROFILES_DIR) if r.get("device") == name]


def dry_run(args, todo, workers: int) -> str:
    """The expected wall time of the runs to do, from this device's profile records (measured on
    the spot, and said so, where there are none)."""
    from protocols.estimate import estimate, format_estimates, human, total_seconds

    name, profiles = _this_device_measurements(args)
    est = estimate(todo, profiles, device=args.device, batch_size=args.profile_batch,
                   eval_batch_size=args.eval_batch_size, progress=None if args.quiet else print)
    text = format_estimates(est, name, [r for r in profiles if r.get("kind") == "loader"])
    if workers > 1:  # profiled at one thread per run: runs spread over the worker processes
        text += (f"\nwith {workers} worker processes of one thread each: about "
                 f"{human(total_seconds(est) / workers)} if the cores are free")
    return text


def cmd_profile(args) -> None:
    """Measure every method at its protocols' real shape on this device, keep the records beside
    the leaderboard (`leaderboard/profiles/`), print them, and re-render the cost page."""
    from leaderboard.layout import PROFILES_DIR
    from leaderboard.records import add_measurements
    from protocols.devices import check_device, device_slug
    from protocols.profile import format_profile, profile
    from protocols.sweep import parse_overrides, resolve_backbones

    check_device(args.device)
    protocols = _split(args.protocols)
    methods = ["all"] if args.methods == "all" else _split(args.methods)
    records = []
    for pname in protocols:
        records += profile([pname], resolve_backbones(pname, args.backbones),
                           methods, device=args.device, precision=args.precision,
                           batch_size=args.profile_batch, eval_batch_size=args.eval_batch_size,
                           threads=args.threads, overrides=parse_overrides(args.set),
                           progress=None if args.quiet else print)
    if records:
        path = add_measurements(records, PROFILES_DIR / f"{device_slug(records[0]['device'])}.jsonl")
        print(format_profile(records))
        print(f"{len(records)} profile records added to {path}")
    if not args.no_render:
        render_leaderboard(args)


def cmd_smoke(args) -> int:
    """Run the dry run, keep one smoke record per run (leaderboard/smoke/, shown on the cost page)
    and re-render; exit 1 if a run did not complete."""
    from leaderboard.layout import SMOKE_DIR
    from leaderboard.records import add_measurements
    from leaderboard.store import RunStore
    from protocols.devices import check_device, device_slug
    from protocols.record import REAL_PROTOCOLS
    from protocols.smoke import run_smoke

    check_device(args.device)
    protocols = list(REAL_PROTOCOLS) if args.protocols == "real" else _split(args.protocols)
    methods = ["all"] if args.methods == "all" else _split(args.methods)
    store = RunStore(args.store)
    store.check_writable()
    done = []
    for smoke in run_smoke(protocols, methods, store=store, tasks=args.smoke_tasks, device=args.device,
                           threads=args.threads or 1, eval_batch_size=args.eval_batch_size,
                           quiet=not args.verbose):
        print(smoke.line(), flush=True)
        add_measurements([smoke.smoke], SMOKE_DIR / f"{device_slug(smoke.smoke['device'])}.jsonl")
        done.append(smoke)
    complete = sum(s.smoke["complete"] for s in done)
    print(f"smoke: {complete}/{len(done)} runs complete in {sum(s.smoke['wall_s'] for s in done):.0f} s; "
          f"records in {args.store}, smoke records in {SMOKE_DIR}/")
    if not args.no_render:
        render_leaderboard(args)
    return 0 if complete == len(done) else 1


def cmd_cost(args) -> None:
    import json

    from protocols.cost_table import cost_rows
    from protocols.devices import check_device
    from protocols.sweep import parse_overrides

    check_device(args.device)
    rows = cost_rows(_split(args.protocols), args.backbones, _split(args.methods) if args.methods != "all" else ["all"],
                     parse_overrides(args.set), weights_dir=args.weights_dir, random_init=args.random_init,
                     allow_download=args.allow_download, device=args.device)
    if args.format == "json":
        for row in rows:
            print(json.dumps(row))
    else:
        from tabulate import tabulate
        print(tabulate(rows, headers="keys", tablefmt="github"))


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from leaderboard.output import OutputError
    from leaderboard.store import StoreError
    from leaderboard.records import RecordConflict
    from protocols.record import RecordError
    from protocols.errors import USER_ERRORS
    from protocols.catalog import load_plugins

    try:
        load_plugins(args.plugin)
        if args.list:
            from protocols.catalog import listing
            print(listing())
        elif args.publish is not None:
            cmd_publish(args)
            if not args.no_render:
                render_leaderboard(args)
        elif args.report:
            render_leaderboard(args)
        elif args.export:
            cmd_export(args)
        elif args.cost:
            cmd_cost(args)
        elif args.profile:
            cmd_profile(args)
        elif args.smoke:
            return cmd_smoke(args)
        else:
            return cmd_sweep(args, argv)
    except (*USER_ERRORS, RecordError, RecordConflict, OutputError, StoreError) as e:
        if os.environ.get("PROMPTCL_DEBUG"):
            raise
        # one line, whatever the message's layout (lists of paths, YAML's pointers, conflicts)
        print("error: " + " ".join(line.strip() for line in str(e).splitlines() if line.strip()),
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a sweep says this itself; the other long commands (--smoke, --profile) here
        print("interrupted: every run, smoke or profile record that finished is kept; rerun the command "
              "for the rest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
