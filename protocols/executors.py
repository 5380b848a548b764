"""Where runs execute: this process, local worker processes, a Ray cluster, or Slurm (submitit).

Every executor takes the same `RunSpec`s and `RunOptions` and yields `(spec, outcome)` pairs as
runs complete, where the outcome is the run's record (a dict) or a `RunFailure` (the error and the
worker's traceback): a run that raises is reported under its own spec and the other runs go on.
The driver (`run_suite.py`) alone writes the store, so a worker never touches SQLite.
`execute(..., failures="raise")` instead raises the first failure in the driver, as its original
exception type where it survives the trip, with the run and the worker's traceback in a note.

Nothing here reads `sys.argv`: a Ray or Slurm worker has its own command line, so the driver's
is the driver's to stamp into records.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import closing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from methods import registry

from .devices import check_gpus, wants_gpu
from .errors import ExecutorError
from .runner import RunOptions, RunSpec, run

EXECUTORS = ("local", "processes", "ray", "slurm")
FAILURE_MODES = ("raise", "yield")


@dataclass(frozen=True)
class RunFailure:
    """A run that raised: what the driver stores as a failed run. Picklable, so it crosses
    process, Ray and Slurm boundaries like a record does."""
    error: str      # "ValueError: the message"
    traceback: str  # the worker's formatted traceback ("" when the worker itself was lost)
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_exception(cls, e: BaseException, portable: bool = False) -> RunFailure:
        """`portable`: keep the exception object only if it survives pickling (it must travel)."""
        keep = e if not portable or _survives_pickling(e) else None
        return cls(f"{type(e).__name__}: {e}",
                   "".join(traceback.format_exception(type(e), e, e.__traceback__)), keep)


Outcome = dict[str, Any] | RunFailure  # a record, or why there is none


def _survives_pickling(e: BaseException) -> bool:
    try:
        pickle.loads(pickle.dumps(e))
        return True
    except Exception:
        return False


def _portable(spec: RunSpec, options: RunOptions, threads: int) -> tuple[RunSpec, RunOptions]:
    """The spec and options as another process sees them: relative paths made absolute (a worker's
    working directory is not the driver's) and the torch thread count made explicit."""
    protocol = spec.protocol
    if Path(protocol).suffix:  # a YAML file rather than a shipped protocol name
        protocol = str(Path(protocol).expanduser().resolve())
    absolute = {k: str(Path(v).expanduser().resolve()) for k in ("data_root", "weights_dir")
                if (v := getattr(options, k)) is not None}
    return (replace(spec, protocol=protocol),
            replace(options, threads=options.threads or threads, **absolute))


_PLUGINS_LOADED: set[str] = set()


def _run_caught(spec: RunSpec, options: RunOptions, plugins: Sequence[str] = (),
                portable: bool = True) -> Outcome:
    """One run in a worker: the user's plugins first (once per process), then the run; an
    exception comes back as a `RunFailure`. KeyboardInterrupt and SystemExit are not caught."""
    try:
        if plugins:
            for plugin in plugins:
                if plugin not in _PLUGINS_LOADED:
                    registry.load_plugin(plugin)
                    _PLUGINS_LOADED.add(plugin)
        return run(spec, options)
    except Exception as e:
        return RunFailure.from_exception(e, portable=portable)


def _plugin_paths(plugins: Sequence[str]) -> list[str]:
    """A plugin file as an absolute path (workers run elsewhere); a module name as it is."""
    return [str(Path(p).expanduser().resolve())
            if p.endswith(".py") or Path(p).is_file() else p for p in plugins]


def run_local(specs: Iterable[RunSpec], options: RunOptions) -> Iterator[tuple[RunSpec, Outcome]]:
    """One run after the other in this process (the backbone is loaded once and shared)."""
    for spec in specs:
        yield spec, _run_caught(spec, options, portable=False)


def default_workers(n_runs: int, threads_per_run: int = 1) -> int:
    """Local worker processes for `n_runs` runs of `threads_per_run` torch threads each: as many as
    the CPUs this process may use hold, at least 1 and never more than there are runs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(n_runs, cpus // max(1, threads_per_run)))


def _init_process_worker(threads: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the driver alone handles it (and
    # terminates the workers), so the workers ignore it instead of each printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A driver killed outright (SIGKILL, the OOM killer, a lost session) cannot stop its pool:
    # the workers would finish their run, then wait forever for the next one, holding memory
    # (and a GPU). Each worker watches its parent and exits once it is gone.
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)


def _exit_with_parent(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)  # the driver is gone: no one would store this run


def _terminate(pool: ProcessPoolExecutor, grace_s: float = 10.0) -> None:
    """Stop the pool's worker processes now, and wait until each has exited.

    shutdown() waits for the running calls, and ProcessPoolExecutor has no public way to stop
    them before Python 3.14 (terminate_workers()): the processes are reachable only as
    `_processes`. Each gets SIGTERM, then SIGKILL if it is still alive after `grace_s`, so a
    Ctrl-C never waits on a worker that does not die, and shutdown() then finds them all gone."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def run_processes(specs: Iterable[RunSpec], options: RunOptions, *, workers: int,
                  plugins: Sequence[str] = ()) -> Iterator[tuple[RunSpec, Outcome]]:
    """Independent runs in `workers` local processes (`--workers N`).

    The standard library's process pool rather than Ray: one machine needs no cluster, no 240 MB
    dependency and no start-up of its own, and the pool reports a worker that dies. Workers are
    spawned (a forked copy of a driver that has touched torch threads or CUDA is unsafe) and each
    keeps its backbone loaded between runs. A run uses `options.threads` torch threads, 1 if unset.
    `plugins` (file paths or module names) are loaded in every worker, as `--plugin` was in the
    driver. If the driver stops early (Ctrl-C, an exception, the consumer closing the generator)
    the workers are terminated: none outlives the driver."""
    specs = list(specs)
    if workers < 1:
        raise ValueError(f"--workers {workers}: give at least 1 worker process")
    if not specs:
        return
    threads = options.threads or 1
    plugins = _plugin_paths(plugins)
    pool = ProcessPoolExecutor(max_workers=min(workers, len(specs)),
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_process_worker, initargs=(threads,))
    finished = False
    try:
        pending = {pool.submit(_run_caught, *_portable(spec, options, threads), plugins): spec
                   for spec in specs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                spec = pending.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool as e:
                    outcome = RunFailure(f"BrokenProcessPool: a worker process died (killed, out "
                                         f"of memory or crashed) before this run finished: {e}", "")
                except Exception as e:  # e.g. a result that could not be pickled back
                    outcome = RunFailure.from_exception(e)
                yield spec, outcome
        finished = True
    finally:
        if not finished:
            _terminate(pool)  # every worker has exited when this returns
        pool.shutdown(wait=True, cancel_futures=True)


def run_ray(specs: Iterable[RunSpec], options: RunOptions, *, address: str | None = None,
            cpus_per_run: float | None = None, gpus_per_run: float | None = None,
            plugins: Sequence[str] = ()) -> Iterator[tuple[RunSpec, Outcome]]:
    """Each run as a Ray task (`--executor ray --address HOST:PORT`; a local Ray if None and none
    is running, shut down again at the end).

    A task reserves `cpus_per_run` CPUs (default: `options.threads`, else 1) and runs with that
    many torch threads unless `options.threads` says otherwise. GPUs: none for `--device cpu`;
    otherwise `gpus_per_run` (fractions share a GPU), by default 1 for a CUDA device, and for
    "auto" 1 where the cluster has GPUs at all."""
    try:
        import ray
    except ImportError:
        raise ExecutorError("--executor ray needs Ray: pip install 'promptcl[ray]'") from None
    check_gpus(options.device, gpus_per_run)
    specs = list(specs)
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    if gpus_per_run is None:
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        gpus_per_run = 1.0 if options.device.startswith("cuda") or (
            options.device == "auto" and has_gpus) else 0.0
    cpus = cpus_per_run or options.threads or 1
    remote = ray.remote(num_cpus=cpus, num_gpus=gpus_per_run, max_retries=0)(_run_caught)
    plugins = _plugin_paths(plugins)
    pending: dict = {}
    finished = False
    try:
        for spec in specs:
            pending[remote.remote(*_portable(spec, options, max(1, int(cpus))), plugins)] = spec
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                spec = pending.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker or its node was lost
                    outcome = RunFailure.from_exception(e)
                yield spec, outcome
        finished = True
    finally:
        if not finished:
            for ref in pending:
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def slurm_parameters(options: RunOptions, *, gpus_per_run: int | None = None,
                     cpus_per_run: int | None = None, timeout_min: int = 720,
                     partition: str | None = None) -> dict[str, Any]:
    """submitit's parameters for one run's job, following the run's device.

    GPUs: none for `--device cpu`; otherwise `gpus_per_run`, default 1 (a run uses one device;
    "auto" counts as CUDA, since a compute node's "auto" is its GPU: say `--device cpu` for CPU
    jobs). CPUs: `cpus_per_run`, default `options.threads`, else 8 for a GPU job (data loading)
    and 1 for a CPU job."""
    check_gpus(options.device, gpus_per_run)
    gpus = (1 if gpus_per_run is None else int(gpus_per_run)) if wants_gpu(options.device) else 0
    cpus = cpus_per_run or options.threads or (8 if gpus else 1)
    params: dict[str, Any] = {"timeout_min": timeout_min, "cpus_per_task": cpus}
    if gpus:
        params["gpus_per_node"] = gpus
    if partition:
        params["slurm_partition"] = partition
    return params


def slurm_executor(folder: str, parameters: dict[str, Any], cluster: str | None = None):
    """A submitit AutoExecutor with `parameters` (from `slurm_parameters`) applied
    (`cluster="debug"` runs the jobs in this process: tests)."""
    try:
        import submitit
    except ImportError:
        raise ExecutorError(
            "--executor slurm needs submitit: pip install 'promptcl[slurm]'") from None
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**parameters)
    return executor


def run_slurm(specs: Iterable[RunSpec], options: RunOptions, *, folder: str = "results/slurm",
              partition: str | None = None, timeout_min: int = 720, gpus_per_run: int | None = None,
              cpus_per_run: int | None = None, cluster: str | None = None, poll_s: float = 10.0,
              plugins: Sequence[str] = ()) -> Iterator[tuple[RunSpec, Outcome]]:
    """Each run as one Slurm job of a submitit job array (`--executor slurm`); resources from
    `slurm_parameters`. Jobs still queued or running when the driver stops early are cancelled."""
    parameters = slurm_parameters(options, gpus_per_run=gpus_per_run, cpus_per_run=cpus_per_run,
                                  timeout_min=timeout_min, partition=partition)
    executor = slurm_executor(folder, parameters, cluster)
    specs = list(specs)
    shipped = [_portable(spec, options, parameters["cpus_per_task"]) for spec in specs]
    plugins = _plugin_paths(plugins)
    jobs = executor.map_array(_run_caught, [s for s, _ in shipped], [o for _, o in shipped],
                              [plugins] * len(specs))
    pending = dict(zip(jobs, specs))
    finished = False
    try:
        while pending:
            for job in [j for j in pending if j.done()]:
                spec = pending.pop(job)
                try:
                    outcome = job.result()
                except Exception as e:  # the job itself failed: timeout, preemption, node lost
                    outcome = RunFailure.from_exception(e)
                yield spec, outcome
            if pending:
                time.sleep(poll_s)
        finished = True
    finally:
        if not finished:
            for job in pending:
                job.cancel(check=False)


def _raise_first_failure(outcomes: Iterator[tuple[RunSpec, Outcome]]
                         ) -> Iterator[tuple[RunSpec, dict[str, Any]]]:
    with closing(outcomes):  # stops the executor's workers before the failure propagates
        for spec, outcome in outcomes:
            if isinstance(outcome, RunFailure):
                error = outcome.exception or RuntimeError(outcome.error)
                where = (f"run {spec.protocol} {spec.backbone} {spec.display_label} seed "
                         f"{spec.seed} failed")
                if error.__traceback__ is None and outcome.traceback:  # raised in another process
                    where += f"; its traceback there:\n{outcome.traceback}"
                error.add_note(where)
                raise error
            yield spec, outcome


def execute(kind: str, specs: Iterable[RunSpec], options: RunOptions, *,
            failures: str = "raise", **kw) -> Iterator[tuple[RunSpec, Outcome]]:
    """Run `specs` on executor `kind` (one of EXECUTORS; "processes" needs `workers=N`).

    failures="yield": `(spec, record)` or `(spec, RunFailure)` for every run, the sweep goes on.
    failures="raise": `(spec, record)` until the first failure, which is raised here."""
    if failures not in FAILURE_MODES:
        raise ValueError(f"failures={failures!r}; valid: {', '.join(FAILURE_MODES)}")
    executors = {"local": run_local, "processes": run_processes, "ray": run_ray, "slurm": run_slurm}
    if kind not in executors:
        raise ValueError(f"unknown executor {kind!r}; valid: {', '.join(EXECUTORS)}")
    outcomes = executors[kind](specs, options, **kw)
    return outcomes if failures == "yield" else _raise_first_failure(outcomes)
