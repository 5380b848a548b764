#!/usr/bin/env python
"""promptcl: run protocols x backbones x methods x seeds, store every run, write the leaderboard.

    python run_suite.py --methods all --seeds 5            # the embedded default (fmnist-5t, tiny)
    python run_suite.py --list                             # methods, protocols, backbones
    python run_suite.py --protocols cifar100-10t --backbones sup21k --methods l2p,smope --seeds 5
    python run_suite.py --ablation smope --seeds 5         # the SMoPE ablation table
    python run_suite.py --cost --protocols cifar100-10t --backbones sup21k --random-init --format json
    python run_suite.py --export runs.csv                  # one row per stored run
    python run_suite.py --profile                          # wall time of the default sweep

A sweep skips runs whose key is already in the store; a run is stored only once it completed, so
an interrupted sweep resumes where it stopped. The leaderboard is rebuilt from the store alone.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

DEFAULT_PROTOCOLS = ["fmnist-5t"]


def _quiet_imports() -> None:
    # Avalanche warns at import that qpsolvers has no solver (only GEM / A-GEM need one).
    warnings.filterwarnings("ignore", message=".*QP solver.*")
    warnings.filterwarnings("ignore", message=".*open_source_solvers.*")
    warnings.filterwarnings("ignore", message="No loggers specified.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="run_suite.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--methods", default="all", help="'all' or a comma list (see --list)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    ap.add_argument("--protocols", default=",".join(DEFAULT_PROTOCOLS),
                    help="comma list of protocol names or YAML paths, or 'all' (default fmnist-5t)")
    ap.add_argument("--backbones", default="default",
                    help="comma list, 'default' (each protocol's first) or 'all' (each protocol's list)")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME",
                    help="run the protocol's ablation NAME (e.g. smope) instead of --methods")
    ap.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                    help="override a hyperparameter, e.g. --set smope.top_k=3 (repeatable)")
    ap.add_argument("--data-root", default=os.environ.get("PROMPTCL_DATA_ROOT", "data"))
    ap.add_argument("--weights-dir", default="pretrained", help="folder of the ViT-B/16 checkpoints")
    ap.add_argument("--store", default="results/suite.sqlite", help="SQLite run store")
    ap.add_argument("--leaderboard-dir", default="leaderboard", help="where the markdown goes")
    ap.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:0, ...")
    ap.add_argument("--eval-batch-size", type=int, default=256)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16: autocast training and evaluation (for GPUs; part of the run key)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads per run (default: torch's choice)")
    ap.add_argument("--plugin", action="append", default=[], metavar="FILE.py|module",
                    help="import a method plugin (repeatable)")
    ap.add_argument("--download", action="store_true", help="let torchvision download Fashion-MNIST")
    ap.add_argument("--allow-download", action="store_true",
                    help="let timm fetch sup21k / sup1k weights from its hub if no file is found")
    ap.add_argument("--quiet", action="store_true", help="no per-epoch progress or metric logs")
    ap.add_argument("--no-render", action="store_true", help="do not rewrite the leaderboard")
    ap.add_argument("--list", action="store_true", help="list methods, protocols and backbones")
    ap.add_argument("--export", metavar="FILE.csv", help="write one CSV row per stored run and exit")
    ap.add_argument("--cost", action="store_true", help="print parameter / pass / GFLOP counts and exit")
    ap.add_argument("--random-init", action="store_true",
                    help="with --cost: build the backbone with random weights (nothing read or fetched)")
    ap.add_argument("--format", choices=["table", "json"], default="table", help="--cost output")
    ap.add_argument("--profile", action="store_true",
                    help="time the default sweep in a temporary store and print the figures")
    ap.add_argument("--dry-run", action="store_true", help="print the runs a sweep would do")
    ap.add_argument("--executor", choices=["local", "ray", "slurm"], default="local",
                    help="where runs execute; only this driver writes the store")
    ap.add_argument("--address", default=None, help="Ray cluster address (with --executor ray)")
    ap.add_argument("--slurm-partition", default=None)
    ap.add_argument("--slurm-timeout-min", type=int, default=720)
    ap.add_argument("--slurm-folder", default="results/slurm")
    return ap.parse_args(argv)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise SystemExit(f"--set expects METHOD.KEY=VALUE, got {item!r}")
        lhs, value = item.split("=", 1)
        method, key = lhs.split(".", 1)
        out.setdefault(method, {})[key] = value
    return out


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def plan(args: argparse.Namespace):
    """The list of RunSpecs of this invocation (protocols x backbones x methods|variants x seeds)."""
    from methods import registry
    from protocols.runner import RunSpec
    from protocols.schema import available, load_protocol

    protocols = available() if args.protocols == "all" else _split(args.protocols)
    overrides = parse_overrides(args.set)
    methods = registry.names() if args.methods == "all" else _split(args.methods)
    for m in methods + list(overrides):
        registry.get(m)  # unknown names fail here, with the list of valid ones
    specs = []
    for pname in protocols:
        proto = load_protocol(pname)
        if args.backbones == "default":
            bbs = list(proto.backbones[:1]) or ["tiny"]
        elif args.backbones == "all":
            bbs = list(proto.backbones) or ["tiny"]
        else:
            bbs = _split(args.backbones)
        for bb in bbs:
            runs: list[tuple[str, dict, str, str]] = []
            if args.ablation:
                for ab_name in args.ablation:
                    if ab_name not in proto.ablations:
                        raise SystemExit(f"protocol {proto.name} has no ablation {ab_name!r}; "
                                         f"it has: {', '.join(proto.ablations) or 'none'}")
                    ab = proto.ablations[ab_name]
                    variants = ab.variants
                    if variants == "ladder":
                        cls = registry.get(ab.method)
                        ladder = getattr(cls, "ABLATION", None) or getattr(
                            sys.modules[cls.__module__], "ABLATION", None)
                        if not ladder:
                            raise SystemExit(f"method {ab.method} defines no ABLATION ladder")
                        variants = dict(ladder)
                    for position, (label, ov) in enumerate(variants.items()):
                        merged = {**ov, **overrides.get(ab.method, {})}
                        runs.append((ab.method, merged, label, f"ablation:{ab_name}", position))
            else:
                runs = [(m, overrides.get(m, {}), "", "main", 0) for m in methods]
            for method, ov, label, table, position in runs:
                for seed in range(args.seeds):
                    # a YAML path stays a (resolved) path, so workers elsewhere can read it
                    where = str(Path(pname).resolve()) if Path(pname).suffix else proto.name
                    specs.append(RunSpec(where, bb, method, seed, ov, label, table, position,
                                         args.precision))
    return specs


def cmd_list() -> None:
    from methods import backbones, registry
    from protocols.schema import available, load_protocol

    print("methods:")
    for name in registry.names():
        cls = registry.get(name)
        print(f"  {name:<12} {cls.description or (cls.__doc__ or '').strip().splitlines()[0]}")
    print("protocols:")
    for name in available():
        p = load_protocol(name)
        print(f"  {name:<15} {p.description}  [backbones: {', '.join(p.backbones)}]")
    print("backbones:")
    for name in backbones.names():
        print(f"  {name:<8} {backbones.get_spec(name).description}")


def cmd_cost(args: argparse.Namespace) -> None:
    from methods import backbones, registry
    from protocols.cost import cost_row
    from protocols.runner import resolve_device
    from protocols.schema import load_protocol

    overrides = parse_overrides(args.set)
    methods = registry.names() if args.methods == "all" else _split(args.methods)
    rows = []
    for pname in _split(args.protocols):
        proto = load_protocol(pname)
        bbs = list(proto.backbones[:1]) if args.backbones == "default" else _split(args.backbones)
        num_classes = {"fashion_mnist": 10, "cifar100": 100, "imagenet_r": 200, "cub200": 200}[proto.dataset]
        for bb in bbs:
            vit = backbones.load(bb, args.weights_dir, args.random_init, args.allow_download).vit
            for m in methods:
                hp = registry.resolve_hparams(m, proto.name, proto.methods.get(m, {}), overrides.get(m, {}))
                row = cost_row(m, vit, num_classes, hp, device=str(resolve_device(args.device)))
                row = {"protocol": proto.name, "backbone": bb, **row}
                rows.append(row)
                if args.format == "json":
                    print(json.dumps(row), flush=True)
    if args.format == "table":
        from tabulate import tabulate
        print(tabulate(rows, headers="keys", tablefmt="github"))


def sweep(args: argparse.Namespace, specs) -> list[dict]:
    """Run every spec not yet in the store, storing each record as soon as it completes."""
    from tqdm import tqdm

    from leaderboard.store import RunStore
    from protocols.executors import execute
    from protocols.runner import RunOptions, spec_key

    store = RunStore(args.store)
    keyed = [(spec, spec_key(spec)) for spec in specs]
    todo = [(s, k) for s, k in keyed if not store.has(k)]
    print(f"{len(specs)} runs planned, {len(specs) - len(todo)} already in {args.store}, "
          f"{len(todo)} to run", flush=True)
    if args.dry_run:
        for s, k in todo:
            print(f"  {s.protocol} {s.backbone} {s.display_label} seed={s.seed} key={k[:12]}")
        return []
    options = RunOptions(data_root=args.data_root, weights_dir=args.weights_dir, device=args.device,
                         eval_batch_size=args.eval_batch_size, quiet=True if args.quiet else not sys.stderr.isatty(),
                         download=args.download, allow_download=args.allow_download,
                         threads=args.threads)
    kw: dict = {}
    if args.executor == "ray":
        kw = {"address": args.address, "num_gpus": 1.0 if options.device != "cpu" and _has_cuda() else 0.0}
    elif args.executor == "slurm":
        kw = {"folder": args.slurm_folder, "partition": args.slurm_partition,
              "timeout_min": args.slurm_timeout_min}
    done = []
    bar = tqdm(total=len(todo), desc="sweep", unit="run", disable=args.quiet and not sys.stderr.isatty())
    for spec, record in execute(args.executor, [s for s, _ in todo], options, **kw):
        store.put(record)
        done.append(record)
        bar.update(1)
        bar.write(f"{spec.protocol:<14} {spec.backbone:<7} {spec.display_label:<14} seed {spec.seed}: "
                  f"FAA {record['metrics']['faa']:6.2f}  CAA {record['metrics']['caa']:6.2f}  "
                  f"FFM {record['metrics']['ffm']:5.2f}  ({record['timings']['total_s']:.1f} s)")
    bar.close()
    return done


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def render_leaderboard(args: argparse.Namespace) -> None:
    from leaderboard.render import render
    from leaderboard.store import RunStore

    records = RunStore(args.store).records()
    written = render(records, out_dir=args.leaderboard_dir)
    print(f"leaderboard: {len(records)} stored runs -> {len(written)} files in {args.leaderboard_dir}/")


def cmd_profile(args: argparse.Namespace) -> None:
    """The default sweep's wall time, per method, in a throw-away store (nothing else touched)."""
    import collections

    tmp = Path(tempfile.mkdtemp(prefix="promptcl-profile-"))
    args.store = str(tmp / "profile.sqlite")
    args.quiet = True
    start = time.time()
    specs = plan(args)
    records = sweep(args, specs)
    wall = time.time() - start
    per = collections.defaultdict(list)
    for r in records:
        per[r["label"]].append(r["timings"]["total_s"])
    print(f"\ndefault sweep: {len(records)} runs in {wall:.1f} s wall ({os.cpu_count()} CPUs, "
          f"torch threads {__import__('torch').get_num_threads()})")
    for label, ts in per.items():
        print(f"  {label:<14} {len(ts)} runs  mean {sum(ts) / len(ts):6.2f} s  total {sum(ts):7.1f} s")
    shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    args = parse_args(argv)
    from benchmarks import DataNotFoundError
    from methods import registry
    from methods.backbones import BackboneError
    from methods.registry import UnknownMethodError
    from protocols.schema import ProtocolError

    try:
        for plugin in args.plugin:
            registry.load_plugin(plugin)
        if args.list:
            cmd_list()
        elif args.export:
            from leaderboard.store import RunStore, export_csv
            records = RunStore(args.store).records()
            export_csv(records, args.export)
            print(f"exported {len(records)} runs to {args.export}")
        elif args.cost:
            cmd_cost(args)
        elif args.profile:
            cmd_profile(args)
        else:
            specs = plan(args)
            sweep(args, specs)
            if not args.no_render and not args.dry_run:
                render_leaderboard(args)
    except (DataNotFoundError, BackboneError, UnknownMethodError, ProtocolError, FileNotFoundError,
            ValueError) as e:
        if os.environ.get("PROMPTCL_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
