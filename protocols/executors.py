"""Where runs execute: this process, a Ray cluster, or Slurm through submitit.

Every executor takes the same `RunSpec`s and `RunOptions` and yields `(spec, record)` pairs as runs
complete; the driver (`run_suite.py`) alone writes the store, so a worker never touches SQLite.
A failed run raises in the driver with the worker's traceback; the records already yielded are
stored, so re-running the sweep resumes after them.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

from .runner import RunOptions, RunSpec, run

EXECUTORS = ("local", "ray", "slurm")


def run_local(specs: Iterable[RunSpec], options: RunOptions) -> Iterator[tuple[RunSpec, dict]]:
    """One run after the other in this process (the backbone is loaded once and shared)."""
    for spec in specs:
        yield spec, run(spec, options)


def run_ray(specs: list[RunSpec], options: RunOptions, *, address: str | None = None,
            num_cpus: float = 1.0, num_gpus: float = 0.0) -> Iterator[tuple[RunSpec, dict]]:
    """Each run as a Ray task (`--executor ray --address HOST:PORT`, or a local Ray if None)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("the Ray executor needs Ray: pip install 'promptcl[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(run)
    pending = {remote.remote(spec, options): spec for spec in specs}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            yield pending.pop(ref), ray.get(ref)


def run_slurm(specs: list[RunSpec], options: RunOptions, *, folder: str = "results/slurm",
              partition: str | None = None, timeout_min: int = 720, gpus_per_node: int = 1,
              cpus_per_task: int = 8, cluster: str | None = None, poll_s: float = 10.0
              ) -> Iterator[tuple[RunSpec, dict]]:
    """Each run as one Slurm job of a submitit job array (`--executor slurm`).

    `cluster="debug"` runs the jobs in this process through submitit's debug executor (tests)."""
    try:
        import submitit
    except ImportError:
        raise RuntimeError("the Slurm executor needs submitit: pip install 'promptcl[slurm]'") from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params = dict(timeout_min=timeout_min, cpus_per_task=cpus_per_task)
    if executor.cluster == "slurm":
        params.update(gpus_per_node=gpus_per_node, slurm_partition=partition)
    executor.update_parameters(**params)
    specs = list(specs)
    jobs = executor.map_array(run, specs, [options] * len(specs))
    pending = dict(zip(jobs, specs))
    while pending:
        for job in [j for j in pending if j.done()]:
            yield pending.pop(job), job.result()
        if pending:
            time.sleep(poll_s)


def execute(kind: str, specs: list[RunSpec], options: RunOptions, **kw) -> Iterator[tuple[RunSpec, dict]]:
    if kind == "local":
        return run_local(specs, options)
    if kind == "ray":
        return run_ray(specs, options, **kw)
    if kind == "slurm":
        return run_slurm(specs, options, **kw)
    raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
