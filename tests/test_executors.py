"""The executors: worker processes and a real local Ray cluster give the records this process gives,
a run that raises comes back under its own spec, Ctrl-C leaves no worker behind, and Slurm asks
for the resources the run's device needs."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks.synthetic import write_fashion_mnist
from protocols import executors
from protocols.errors import ExecutorError
from protocols.executors import RunFailure
from protocols.runner import RunOptions, RunSpec
from helpers import write_tiny_5t

REPO = Path(__file__).resolve().parent.parent

# Two plugin methods that the workers must load themselves: one raises, one stalls (and says where).
PLUGIN = '''
import os, pathlib, time
from methods import register
from methods.head_only import HeadOnly

@register("boom")
class Boom(HeadOnly):
    def task_start(self):
        raise ValueError("boom at task start")

@register("stall")
class Stall(HeadOnly):
    def task_start(self):
        pathlib.Path(os.environ["STALL_DIR"], str(os.getpid())).touch()
        time.sleep(600)
'''


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny Fashion-MNIST in the real IDX format, a 5-task protocol over it at 1 epoch, the
    plugin file, and the records of head_only and smope (seed 0) run in this process."""
    tmp = tmp_path_factory.mktemp("executors")
    write_fashion_mnist(tmp / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    proto = tmp / "tiny-5t.yaml"
    write_tiny_5t(proto, "head_only", "smope")
    (tmp / "exec_plugin.py").write_text(PLUGIN)
    options = RunOptions(data_root=str(tmp / "data"), quiet=True, threads=1)
    specs = [RunSpec(str(proto), "tiny", m, 0) for m in ("head_only", "smope")]
    local = dict(executors.run_local(specs, options))
    assert all(isinstance(r, dict) for r in local.values())
    return tmp, specs, options, local


def assert_same_records(got: dict, local: dict) -> None:
    assert set(got) == set(local)
    for spec, record in got.items():
        assert isinstance(record, dict), f"{spec.method}: {record}"
        for k in ("key", "acc_matrix", "metrics", "per_class_acc", "class_order", "cost"):
            assert record[k] == local[spec][k], (spec.method, k)


def test_process_workers_give_the_local_records_and_report_failures(env):
    tmp, specs, options, local = env
    boom = RunSpec(specs[0].protocol, "tiny", "boom", 0)
    got = dict(executors.run_processes(specs + [boom], options, workers=2,
                                       plugins=[str(tmp / "exec_plugin.py")]))
    failure = got.pop(boom)
    assert_same_records(got, local)
    assert isinstance(failure, RunFailure)
    assert failure.error == "ValueError: boom at task start"
    assert "exec_plugin.py" in failure.traceback and "task_start" in failure.traceback
    assert isinstance(failure.exception, ValueError)  # it crossed the process boundary intact


def test_raise_mode_names_the_run(env, monkeypatch):
    _, specs, options, _ = env

    def boom(spec, options):
        raise ValueError("boom in the run")
    monkeypatch.setattr(executors, "run", boom)
    spec = RunSpec(specs[0].protocol, "tiny", "head_only", 3)
    with pytest.raises(ValueError, match="boom in the run") as info:
        list(executors.execute("local", [spec], options))
    assert any("head_only seed 3 failed" in note for note in info.value.__notes__)
    ((got, failure),) = executors.execute("local", [spec], options, failures="yield")
    assert got == spec and failure.error == "ValueError: boom in the run"


def test_ctrl_c_in_the_driver_stops_every_worker(env):
    tmp, specs, options, _ = env
    stall_dir = tmp / "stalled"
    stall_dir.mkdir()
    driver = tmp / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import faulthandler, signal, sys
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks on a hang
        # A parent that ignores SIGINT (a background job of a non-interactive shell, some pytest
        # workers) passes SIG_IGN on through exec, and Python then installs no KeyboardInterrupt
        # handler: restore the one a terminal's Python has, which is what this test is about.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        from protocols import executors
        from protocols.runner import RunOptions, RunSpec
        if __name__ == "__main__":  # spawned workers import this file again
            specs = [RunSpec({specs[0].protocol!r}, "tiny", "stall", s) for s in (0, 1)]
            options = RunOptions(data_root={options.data_root!r}, quiet=True)
            try:
                for _ in executors.run_processes(specs, options, workers=2,
                                                 plugins=[{str(tmp / "exec_plugin.py")!r}]):
                    pass
            except KeyboardInterrupt:
                sys.exit(130)
    """))
    env = {**os.environ, "STALL_DIR": str(stall_dir), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(driver)], cwd=REPO, env=env)
    workers: list[int] = []
    try:
        deadline = time.time() + 300
        while len(list(stall_dir.iterdir())) < 2:
            assert proc.poll() is None and time.time() < deadline, "the workers never started"
            time.sleep(0.5)
        workers = [int(p.name) for p in stall_dir.iterdir()]
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # every thread's stack, to the captured stderr
            time.sleep(2)
            raise
        assert code == 130
    finally:
        if proc.poll() is None:
            proc.kill()
        time.sleep(1)
        orphans = [pid for pid in workers if _alive(pid)]
        for pid in orphans:  # a failing check must not leave them running either
            os.kill(pid, signal.SIGKILL)
    assert orphans == []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping remains


def test_ray_local_cluster_gives_the_local_records(env):
    """A real local Ray cluster (2 CPUs): the runs travel as Ray tasks and come back the same."""
    import ray  # in the test extra: a missing install fails loudly
    tmp, specs, options, local = env
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        got = dict(executors.run_ray(specs, options))
    finally:
        ray.shutdown()
    assert_same_records(got, local)


def test_default_workers_follow_cpus_threads_and_runs():
    cpus = len(os.sched_getaffinity(0))
    assert executors.default_workers(1000) == cpus
    assert executors.default_workers(1000, threads_per_run=cpus) == 1
    assert executors.default_workers(1) == 1 and executors.default_workers(0) == 1
    with pytest.raises(ValueError, match="--workers 0"):
        list(executors.run_processes([RunSpec("fmnist-5t", "tiny", "head_only", 0)],
                                     RunOptions(), workers=0))


def test_a_missing_executor_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ExecutorError, match=r"pip install 'promptcl\[ray\]'"):
        list(executors.run_ray([], RunOptions()))
    with pytest.raises(ExecutorError, match=r"pip install 'promptcl\[slurm\]'"):
        list(executors.run_slurm([], RunOptions(device="cpu")))


def test_slurm_resources_follow_the_device(tmp_path, monkeypatch):
    """No GPU in the job script of a CPU run; one per run on CUDA (and on "auto", which is the
    node's GPU); --gpus-per-run overrides; contradictions are refused."""
    import submitit
    from submitit.slurm.slurm import SlurmExecutor
    params = executors.slurm_parameters
    assert params(RunOptions(device="cpu")) == {"timeout_min": 720, "cpus_per_task": 1}
    assert params(RunOptions(device="cpu", threads=4))["cpus_per_task"] == 4
    assert params(RunOptions(device="cuda"))["gpus_per_node"] == 1
    assert params(RunOptions(device="auto"), gpus_per_run=2)["gpus_per_node"] == 2
    assert "gpus_per_node" not in params(RunOptions(device="auto"), gpus_per_run=0)
    with pytest.raises(ValueError, match="--device cpu"):
        params(RunOptions(device="cpu"), gpus_per_run=1)
    with pytest.raises(ValueError, match="a CUDA run needs a GPU"):
        params(RunOptions(device="cuda"), gpus_per_run=0)

    # the sbatch script submitit would submit (sbatch is not here: pretend srun exists)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    for device, gpu_lines in (("cpu", []), ("cuda", ["#SBATCH --gpus-per-node=1"])):
        ex = executors.slurm_executor(str(tmp_path), params(RunOptions(device=device),
                                                            partition="p"), cluster="slurm")
        assert isinstance(ex, submitit.AutoExecutor)
        script = ex._executor._make_submission_file_text("python -m job", "uid")
        assert [ln for ln in script.splitlines() if "gpu" in ln or "gres" in ln] == gpu_lines
        assert "#SBATCH --partition=p" in script


def test_slurm_debug_cluster_returns_records_and_failures(env):
    """submitit's debug cluster runs the job array in-process: records and failures come back."""
    tmp, specs, options, local = env
    missing = RunSpec(str(tmp / "missing.yaml"), "tiny", "head_only", 0)
    got = dict(executors.run_slurm([specs[0], missing], options, folder=str(tmp / "slurm"),
                                   cluster="debug", poll_s=0))
    assert "missing.yaml" in got.pop(missing).error
    assert_same_records(got, {specs[0]: local[specs[0]]})
