"""Throughput at a protocol's real shape on the current device: the `profile` command.

Per method, with random backbone weights and synthetic tensors at the backbone's input size (no
data, no weights): images/s of the training step and of evaluation, their FLOPs, the fraction of
the device's matmul peak they sustain, and peak memory; per protocol, the data pipeline's images/s
for each DataLoader worker count. The matmul peak is measured within each method's profile, just
before its timed steps, so that on a shared CPU both see about the same load. The records go to
`leaderboard/profiles/<device-slug>.jsonl`, where `dry-run` (`protocols.estimate`) reads them.

The training step is the strategy's own: `training_epoch()` on a one-batch "loader", so the
forward (query pass included), the masked CE plus aux losses, backward, clipping and the
optimizer step run exactly as in a sweep, plugins and schedule included. It runs in task 0's state
(task id 0, its classes current), as the cost table does: later tasks differ only in small terms
(old-class prototypes in HiDe's contrastive loss, SMoPE's prototype loss). Evaluation is
`eval_epoch()` under no_grad in the last task's state (every class seen, CODA's every component).
Per-task stages (statistics, counting, HiDe's TII stage, SMoPE's task-0 warm-up) are not steps;
the estimate adds them from each method's `task_stages()`.

Timing: the first step of each kind is a warm-up run under `FlopCounterMode` (its FLOPs, backward
included, are the step's FLOPs); then timed steps until `steps` are done or `budget_s` is spent
(at least one). A smaller batch than the method's (`batch_size`, for a CPU) is recorded as
`batch_size` next to the method's own, `hparams_batch_size`. Input transfer is not timed (the
loader records measure the pipeline). On a CPU shared with other work, `cpu_share` says how
much of its threads' time the process got while timed (1.0 = a core per thread to itself) and
`load_avg` the load when the method started; every figure is wall-clock. Peak memory is CUDA's
`max_memory_allocated`; on CPU it is not measured (null): the process's peak RSS is a lifetime
maximum and would charge one method with another's allocations.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from benchmarks import build_stream, classes_per_exp, dataset_facts, synthetic
from methods import backbones, registry
from methods.loading import make_loader

from .cost import cost_row, count_flops
from .devices import device_name, resolve_device
from .record import utc_now
from .runner import method_hparams, versions
from .schema import Protocol, load_protocol


# ---------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(device: torch.device, precision: str = "fp32", n: int | None = None,
                       min_time_s: float = 1.0) -> float:
    """The device's dense matmul rate, TFLOP/s: the best of repeated n x n products in fp32 (bf16
    with `precision="bf16"`) after a warm-up; 2 n^3 FLOPs each: what "fraction of peak" divides
    by."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    inner = 10 if device.type == "cuda" else 1
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    c = torch.empty_like(a)
    torch.mm(a, b, out=c)
    _sync(device)
    best, reps, start = float("inf"), 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_time_s:
        t0 = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / inner)
        reps += 1
    return 2 * n ** 3 / best / 1e12


# ---------------------------------------------------------------------- one method
def _timed(step: Callable[[], None], device: torch.device, steps: int,
           budget_s: float) -> tuple[list[float], float]:
    """Seconds of each timed call of `step` (`steps` of them, fewer once `budget_s` is spent),
    and the process CPU seconds they took."""
    times: list[float] = []
    cpu0, start = time.process_time(), time.perf_counter()
    while len(times) < steps and (not times or time.perf_counter() - start < budget_s):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, time.process_time() - cpu0


def _batch(vit, size: int, classes: Sequence[int], device: torch.device, seed: int) -> list:
    """A synthetic minibatch as Avalanche hands it out: [x, y, task labels]."""
    pe = vit.vit.patch_embed
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, pe.proj.in_channels, *pe.img_size, generator=g)
    y = torch.as_tensor(classes)[torch.randint(len(classes), (size,), generator=g)]
    return [x.to(device), y.to(device), torch.zeros(size, dtype=torch.long, device=device)]


def profile_method(protocol: str | Protocol, backbone: str, method: str, *,
                   vit=None, device: str | torch.device = "auto", precision: str = "fp32",
                   batch_size: int | None = None, eval_batch_size: int = 256, warmup: int = 1,
                   steps: int = 3, budget_s: float = 30.0, overrides: dict | None = None,
                   peak_tflops: float | None = None) -> dict[str, Any]:
    """One profile record: `method`'s training step and evaluation on `backbone` (random weights)
    at `protocol`'s shape (see the module docstring). `batch_size` None = the method's own."""
    from avalanche.training.plugins import EvaluationPlugin

    proto = load_protocol(protocol) if isinstance(protocol, str) else protocol
    dev = resolve_device(device) if isinstance(device, str) else device
    if vit is None:
        vit = backbones.load(backbone, random_init=True).vit
    vit = vit.to(dev)
    num_classes = proto.num_classes
    hp = method_hparams(method, proto, overrides or {})
    bs = int(batch_size or hp["batch_size"])
    cost = cost_row(method, vit, num_classes, hp, device=dev)
    cost.pop("method")

    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    strategy = registry.create(method, vit=vit, num_classes=num_classes, hparams=hp, device=dev,
                               eval_mb_size=eval_batch_size, precision=precision,
                               evaluator=EvaluationPlugin(loggers=[]))
    strategy.model.to(dev)
    tasks = classes_per_exp(num_classes, proto.num_tasks)
    load = os.getloadavg()

    # training: task 0's state, as `_before_training_exp` + `check_model_and_optimizer` leave it
    strategy.task_id = strategy.model.task_id = 0
    strategy.current_classes = strategy.seen_classes = list(range(tasks[0]))
    strategy.is_training = True
    strategy.model.train()
    strategy.make_optimizer()
    strategy._total_iters = 10 ** 9  # the cosine schedule far from its end, as mid-task
    train_batch = _batch(vit, bs, strategy.current_classes, dev, seed=1)

    def train_step() -> None:
        strategy.dataloader = [list(train_batch)]
        strategy.training_epoch()

    train_flops = count_flops(train_step)
    for _ in range(warmup - 1):
        train_step()
    if peak_tflops is None:  # measured next to the steps, so a shared CPU's load is about the same
        peak_tflops = matmul_peak_tflops(dev, precision)
    train_times, train_cpu = _timed(train_step, dev, steps, budget_s)

    # evaluation: the last task's state, every class seen, under no_grad as `strategy.eval`
    strategy.task_id = strategy.model.task_id = proto.num_tasks - 1
    strategy.seen_classes = list(range(num_classes))
    strategy.is_training = False
    strategy.model.eval()
    eval_batch = _batch(vit, eval_batch_size, strategy.seen_classes, dev, seed=2)

    @torch.no_grad()
    def eval_step() -> None:
        strategy.dataloader = [list(eval_batch)]
        strategy.eval_epoch()

    eval_flops = count_flops(eval_step)
    for _ in range(warmup - 1):
        eval_step()
    eval_times, eval_cpu = _timed(eval_step, dev, steps, budget_s)

    peak_mem = torch.cuda.max_memory_allocated(dev) / 2 ** 20 if dev.type == "cuda" else None
    del strategy
    # on a shared CPU: the share of its threads' time the process got while timed (1 = alone)
    cpu_share = None if dev.type == "cuda" else (train_cpu + eval_cpu) / (
        (sum(train_times) + sum(eval_times)) * torch.get_num_threads())
    train_img_s = bs * len(train_times) / sum(train_times)
    eval_img_s = eval_batch_size * len(eval_times) / sum(eval_times)
    train_tflops = train_img_s * train_flops / bs / 1e12
    eval_tflops = eval_img_s * eval_flops / eval_batch_size / 1e12
    return {
        "kind": "profile", "created": utc_now(), "device": device_name(dev), "versions": versions(),
        "protocol": proto.name, "backbone": backbone, "method": method, "precision": precision,
        "batch_size": bs, "hparams_batch_size": int(hp["batch_size"]),
        "eval_batch_size": eval_batch_size, "threads": torch.get_num_threads(),
        "load_avg": [round(v, 2) for v in load],
        "cpu_share": None if cpu_share is None else round(cpu_share, 2),
        "train_img_s": _sig(train_img_s), "eval_img_s": _sig(eval_img_s),
        "train_steps": len(train_times), "eval_steps": len(eval_times),
        "train_gflops_per_img": _sig(train_flops / bs / 1e9),
        "eval_gflops_per_img": _sig(eval_flops / eval_batch_size / 1e9),
        "peak_mem_mb": None if peak_mem is None else round(peak_mem, 1),
        "peak_mem_source": ("cuda max_memory_allocated" if peak_mem is not None
                            else "not measured on CPU"),
        "matmul_tflops": _sig(peak_tflops), "train_tflops": _sig(train_tflops),
        "eval_tflops": _sig(eval_tflops), "frac_peak_train": _sig(train_tflops / peak_tflops),
        "frac_peak_eval": _sig(eval_tflops / peak_tflops),
        "cost": {k: (_sig(v) if isinstance(v, float) else v) for k, v in cost.items()},
    }


def _sig(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant digits: stable, readable records."""
    return float(f"{x:.{digits}g}")


# ---------------------------------------------------------------------- the data pipeline
def _write_synthetic(dataset: str, root: Path) -> None:
    """Every class of `dataset` in its real on-disk format, ~600 training images in all."""
    n = dataset_facts(dataset).num_classes
    if dataset == "fashion_mnist":
        synthetic.write_fashion_mnist(root / "fashion-mnist", train_per_class=600 // n,
                                      test_per_class=1)
    elif dataset == "cifar100":
        synthetic.write_cifar100(root, train_per_class=600 // n, test_per_class=1)
    elif dataset == "imagenet_r":  # 4 per class: 3 train, 1 test under the 80/20 split
        synthetic.write_imagenet_r(root, wnids=[f"n{i:08d}" for i in range(n)], per_class=4,
                                   real_size=True)
    elif dataset == "cub200":  # every other image is train
        synthetic.write_cub200(root, num_classes=n, per_class=6, real_size=True)
    else:
        raise ValueError(f"no synthetic writer for dataset {dataset!r}")


def loader_throughput(protocol: str | Protocol, backbone: str, workers: Iterable[int], *,
                      batch_size: int = 32, device_label: str | None = None
                      ) -> list[dict[str, Any]]:
    """Loader records: images/s of the protocol's training pipeline (reader, decode, its train
    transform at `backbone`'s input size, Avalanche's dataset, a shuffling DataLoader) for each
    worker count, on synthetic files in the real format written to a temporary folder. The first
    batch (worker start-up) is not timed. `mean_px` is the files' mean size (the writer's
    real-size JPEGs, a few hundred pixels a side, as the real photos)."""
    from avalanche.benchmarks.utils.utils import concat_datasets
    from PIL import Image

    proto = load_protocol(protocol) if isinstance(protocol, str) else protocol
    spec = backbones.get_spec(backbone)
    records = []
    with tempfile.TemporaryDirectory(prefix="promptcl-loader-") as tmp:
        root = Path(tmp)
        _write_synthetic(proto.dataset, root)
        # the synthetic ImageNet-R tree has its own wnids, so it takes the suite's stratified
        # split; decoding and transforms cost the same under any split
        info = build_stream(proto.dataset, data_root=root, seed=0, num_tasks=proto.num_tasks,
                            image_size=spec.image_size, in_chans=spec.in_chans,
                            augment=proto.augment, eval_resize=proto.eval_resize,
                            split="stratified" if proto.dataset == "imagenet_r" else None)
        data = concat_datasets([e.dataset for e in info.benchmark.train_stream]).train()
        jpegs = [p for p in root.rglob("*.jpg")]
        mean_px = None
        if jpegs:
            sizes = [Image.open(p).size for p in jpegs]
            mean_px = [round(sum(s[i] for s in sizes) / len(sizes)) for i in (0, 1)]
        for w in workers:
            loader = make_loader(data, batch_size=batch_size, shuffle=True, workers=w)  # the suite's own
            it = iter(loader)
            next(it)
            t0, n = time.perf_counter(), 0
            for batch in it:
                n += len(batch[0])
            seconds = time.perf_counter() - t0
            del it, loader
            records.append({
                "kind": "loader", "created": utc_now(), "device": device_label or "cpu",
                "protocol": proto.name, "backbone": backbone, "image_size": spec.image_size,
                "workers": int(w), "batch_size": batch_size, "images": n,
                "img_s": _sig(n / seconds), "mean_px": mean_px,
                "load_avg": [round(v, 2) for v in os.getloadavg()],
            })
    return records


def default_workers() -> list[int]:
    """0, then powers of two up to the CPU count: the worker counts a loader profile tries."""
    cpus = os.cpu_count() or 1
    return [0] + [2 ** i for i in range(cpus.bit_length()) if 2 ** i <= cpus]


# ---------------------------------------------------------------------- the whole profile
def profile(protocols: Sequence[str], backbones_: Sequence[str], methods: Sequence[str], *,
            device: str = "auto", precision: str = "fp32", batch_size: int | None = None,
            eval_batch_size: int = 256, threads: int | None = None, steps: int = 3,
            budget_s: float = 30.0, loader_workers: Sequence[int] | None = None,
            loader_batch_size: int = 32, overrides: dict[str, dict] | None = None,
            progress: Callable[[str], None] | None = print) -> list[dict]:
    """Profile every method on every protocol x backbone, plus each protocol's loader for every
    worker count (`loader_workers` None: `default_workers()`, [] : none), and return the records
    (the caller keeps them: `leaderboard.records.add_measurements`)."""
    if threads:
        torch.set_num_threads(threads)
    methods = registry.names() if list(methods) == ["all"] else list(methods)
    dev = resolve_device(device)
    name = device_name(dev)
    if progress:
        progress(f"{name}, {precision}, {torch.get_num_threads()} threads")
    workers = default_workers() if loader_workers is None else list(loader_workers)
    records: list[dict] = []
    for pname in protocols:
        proto = load_protocol(pname)
        for bb in backbones_:
            vit = backbones.load(bb, random_init=True).vit
            for m in methods:
                t0 = time.time()
                rec = profile_method(proto, bb, m, vit=vit, device=dev, precision=precision,
                                     batch_size=batch_size, eval_batch_size=eval_batch_size,
                                     steps=steps, budget_s=budget_s,
                                     overrides=(overrides or {}).get(m))
                records.append(rec)
                if progress:
                    progress(f"  {proto.name} {bb} {m}: train {rec['train_img_s']:.4g} img/s, "
                             f"eval {rec['eval_img_s']:.4g} img/s, matmul peak "
                             f"{rec['matmul_tflops']:.4g} TFLOP/s ({time.time() - t0:.0f} s)")
        if workers:
            loader = loader_throughput(proto, backbones_[0], workers, batch_size=loader_batch_size,
                                       device_label=name)
            records += loader
            if progress:
                progress(f"  {proto.name} loader: " + ", ".join(
                    f"{r['workers']} workers {r['img_s']:.4g} img/s" for r in loader))
    return records


def format_profile(records: Sequence[dict]) -> str:
    """The profile and loader records as two tables, for the terminal and the README."""
    from tabulate import tabulate

    prof = [r for r in records if r["kind"] == "profile"]
    rows = [[r["protocol"], r["backbone"], r["method"], r["precision"],
             f"{r['batch_size']}/{r['hparams_batch_size']}", r["eval_batch_size"],
             r["train_img_s"], r["eval_img_s"], r["train_gflops_per_img"], r["eval_gflops_per_img"],
             r["train_tflops"], r["eval_tflops"], f"{100 * r['frac_peak_train']:.0f}%",
             f"{100 * r['frac_peak_eval']:.0f}%",
             r["matmul_tflops"], "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}",
             "-" if r.get("cpu_share") is None else r["cpu_share"]] for r in prof]
    out = []
    if prof:
        for d, threads in sorted({(r["device"], r["threads"]) for r in prof}):
            out.append(f"{d}, {threads} thread(s)")
        out.append(tabulate(rows, headers=[
            "protocol", "backbone", "method", "prec", "batch/own", "eval batch", "train img/s",
            "eval img/s", "train GFLOP/img", "eval GFLOP/img", "train TFLOP/s", "eval TFLOP/s",
            "train % peak", "eval % peak", "matmul TFLOP/s", "peak MB", "CPU share"],
            tablefmt="github"))
    loader = [r for r in records if r["kind"] == "loader"]
    if loader:
        rows = [[r["protocol"], r["image_size"], "x".join(map(str, r["mean_px"] or [])) or "-",
                 r["workers"], r["img_s"]] for r in loader]
        out.append(tabulate(rows, headers=["protocol", "input px", "file px (mean)", "workers",
                                           "loader img/s"], tablefmt="github"))
    return "\n\n".join(out)
