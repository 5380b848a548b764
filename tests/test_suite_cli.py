"""End to end through run_suite.py on a tiny Fashion-MNIST written in the real IDX format."""
import importlib
import re
from pathlib import Path

import pytest

import run_suite
from benchmarks.synthetic import write_fashion_mnist
from leaderboard.store import RunStore
from protocols import executors, record, runner
from protocols.metrics import summarize
from helpers import write_tiny_5t

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture()
def env(tmp_path):
    """A data root with 12 train / 4 test images per class and a 5-task protocol over it."""
    write_fashion_mnist(tmp_path / "data" / "fashion-mnist", train_per_class=12, test_per_class=4)
    proto = tmp_path / "tiny-5t.yaml"
    write_tiny_5t(proto, "head_only", "joint")
    args = ["--protocols", str(proto), "--data-root", str(tmp_path / "data"),
            "--store", str(tmp_path / "runs.sqlite"), "--leaderboard-dir", str(tmp_path / "lb"),
            "--local-leaderboard-dir", str(tmp_path / "local"), "--quiet", "--workers", "1"]
    return tmp_path, args


def test_sweep_stores_runs_renders_and_resumes(env, monkeypatch):
    tmp, args = env
    assert run_suite.main(args + ["--methods", "head_only,joint", "--seeds", "2"]) == 0
    records = RunStore(tmp / "runs.sqlite").records()
    assert len(records) == 4
    for r in records:
        acc = r["acc_matrix"]
        assert len(acc) == 5 and all(acc[j][i] is None for i in range(5) for j in range(i + 1, 5))
        assert r["metrics"]["faa"] == pytest.approx(summarize(acc)["faa"])
        m = r["metrics"]  # a right prediction is right within its task and in the right task
        assert m["final_acc"] <= min(m["wtp"], m["tii"]) + 1e-4 and max(m["wtp"], m["tii"]) <= 100
        assert r["class_order"] == __import__("benchmarks").class_order(10, r["seed"], "shuffled")
        assert r["versions"]["torch"] and r["backbone_sha256"] and r["data_hash"]
        assert set(r) == set(record.FIELDS) - {"split"}  # the one record definition (no ImageNet-R split)
    joint = [r for r in records if r["method"] == "joint"][0]
    final = joint["acc_matrix"][0][4]  # one model: task 0 is judged among more classes as tasks come
    assert all(joint["acc_matrix"][0][i] >= final for i in range(5))
    page = (tmp / "local" / "tiny-5t__tiny.md").read_text()  # not published: the local pages, marked
    assert "head_only (local)" in page and "joint (local)" in page
    assert "tiny-5t__tiny.md" in (tmp / "local" / "README.md").read_text()
    assert not (tmp / "lb").exists()  # a sweep never writes the committed pages
    for r in records:  # what ran, and what one run costs, counted
        assert len(r["code"]["sha256"]) == 64 and f"methods.{r['method']}" in r["code"]["files"]
        assert r["run_gflops"]["total"] == pytest.approx(sum(r["run_gflops"][k] for k in ("train", "stages", "eval")))

    calls = []
    monkeypatch.setattr(executors, "run", lambda *a, **k: calls.append(a) or pytest.fail("re-ran"))
    assert run_suite.main(args + ["--methods", "head_only,joint", "--seeds", "2"]) == 0
    assert calls == []


def test_interrupted_run_leaves_no_record(env, monkeypatch, capsys):
    tmp, args = env
    from methods.base import PromptStrategy

    def boom(self, **kw):
        if self.task_id == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(PromptStrategy, "task_end", boom)
    # Ctrl-C: exit 130 after saying how many runs are stored and that rerunning resumes
    assert run_suite.main(args + ["--methods", "head_only", "--seeds", "1"]) == 130
    assert "rerun the same command to resume" in capsys.readouterr().err
    assert len(RunStore(tmp / "runs.sqlite")) == 0


def test_readme_plugin_example_runs_through_run_suite(env):
    """The worked example in README.md is a complete plugin: it runs as written."""
    tmp, args = env
    code = re.search(r"<!-- plugin-example -->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    plugin = tmp / "my_prompt.py"
    plugin.write_text(code)
    assert run_suite.main(args + ["--plugin", str(plugin), "--methods", "shared_prefix", "--seeds", "1"]) == 0
    (record,) = RunStore(tmp / "runs.sqlite").records(method="shared_prefix")
    assert record["cost"]["trainable_params"] > 0 and len(record["acc_matrix"]) == 5


def test_clear_errors(env, capsys):
    tmp, args = env
    assert run_suite.main(args + ["--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert run_suite.main(args + ["--methods", "head_only", "--set", "head_only.epoch=2"]) == 2
    assert "unknown hyperparameter 'epoch'" in capsys.readouterr().err
    assert run_suite.main(args[:2] + ["--protocols", "no-such-protocol"]) == 2
    assert "shipped protocols" in capsys.readouterr().err
    assert run_suite.main(args + ["--backbones", "sup21k", "--weights-dir", str(tmp / "w"),
                                  "--methods", "head_only", "--seeds", "1"]) == 2
    err = capsys.readouterr().err  # the check before anything runs: the piece, where, how to get it
    assert "weights sup21k" in err and "missing" in err and str(tmp / "w") in err
    assert "python run_suite.py fetch --backbones sup21k" in err
    assert not (tmp / "runs.sqlite").exists() or "sup21k" not in (tmp / "runs.sqlite").read_bytes().decode("latin1")


def test_list_and_export(env, capsys):
    tmp, args = env
    assert run_suite.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "head_only" in out and "fmnist-5t" in out and "tiny" in out
    run_suite.main(args + ["--methods", "head_only", "--seeds", "1"])
    csv = tmp / "runs.csv"
    assert run_suite.main(["export", str(csv), "--store", str(tmp / "runs.sqlite")]) == 0
    lines = csv.read_text().splitlines()
    assert len(lines) == 2 and "faa" in lines[0]


def test_slurm_executor_returns_records_to_the_driver(env):
    """submitit's debug cluster runs the same job array in-process; the driver stores the records."""
    import submitit  # noqa: F401  (in the test extra: a missing install fails loudly)
    tmp, args = env
    specs = [runner.RunSpec(str(tmp / "tiny-5t.yaml"), "tiny", "head_only", s) for s in (0, 1)]
    opts = runner.RunOptions(data_root=str(tmp / "data"), quiet=True)
    got = list(executors.run_slurm(specs, opts, folder=str(tmp / "slurm2"), cluster="debug", poll_s=0))
    assert sorted(s.seed for s, _ in got) == [0, 1]
    local = dict(executors.run_local(specs[:1], opts))
    assert got[[s.seed for s, _ in got].index(0)][1]["acc_matrix"] == local[specs[0]]["acc_matrix"]


def test_bf16_precision_is_opt_in_recorded_and_keyed(env):
    tmp, args = env
    assert run_suite.main(args + ["--methods", "head_only", "--seeds", "1", "--no-render"]) == 0
    assert run_suite.main(args + ["--methods", "head_only", "--seeds", "1", "--no-render",
                                  "--precision", "bf16"]) == 0
    fp32, bf16 = sorted(RunStore(tmp / "runs.sqlite").records(), key=lambda r: r["precision"] == "bf16")
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16") and fp32["key"] != bf16["key"]
    assert "precision" not in fp32["spec"] and bf16["spec"]["precision"] == "bf16"


def test_bf16_autocast_reaches_the_forward_only(tiny):
    import torch
    from helpers import stream
    from methods import registry

    s = registry.create("head_only", vit=tiny, num_classes=4, hparams={"epochs": 1}, precision="bf16")
    head_out = []
    s.model.head.register_forward_hook(lambda m, i, o: head_out.append(o.dtype))
    s.train(stream().train_stream[0])
    assert head_out and set(head_out) == {torch.bfloat16}  # the minibatch forward is autocast
    assert all(p.dtype == torch.float32 for p in s.model.parameters())
    fp32 = registry.create("head_only", vit=tiny, num_classes=4, hparams={"epochs": 1})
    head_out.clear()
    fp32.model.head.register_forward_hook(lambda m, i, o: head_out.append(o.dtype))
    fp32.train(stream().train_stream[0])
    assert set(head_out) == {torch.float32}


@pytest.mark.parametrize("command, module, function", [("smoke", "protocols.smoke", "run_smoke"),
                                                       ("profile", "protocols.profile", "profile")])
def test_ctrl_c_in_a_long_command_is_one_line_and_exit_130(monkeypatch, capsys, tmp_path, command, module,
                                                         function):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module(module), function, interrupted)
    store = ["--store", str(tmp_path / "runs.sqlite")] if command == "smoke" else []  # profile stores no run
    assert run_suite.main([command, *store, "--no-render"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted:") and "\n" not in err and "Traceback" not in err


# ------------------------------------------------------------------------------ the commands

def parsed(argv):
    return vars(run_suite.parse_args(argv))


def test_options_without_a_command_are_a_sweep_and_nothing_is_the_default_sweep():
    bare = ["--methods", "all", "--seeds", "5"]
    assert parsed(bare) == parsed(["sweep", *bare])
    default = parsed([])
    assert default["command"] == "sweep" and default["protocols"] == "fmnist-5t" and default["seeds"] == 5
    assert default["methods"] is None and default["ablation"] == [] and default["store"] == "results/suite.sqlite"
    assert parsed(["--ablation", "all"])["command"] == "sweep"


def test_each_command_has_its_own_options_and_defaults():
    assert parsed(["smoke"])["protocols"] == "real" and parsed(["smoke"])["store"] == "results/smoke.sqlite"
    assert parsed(["publish"])["source"] is None and parsed(["publish", "cluster.sqlite"])["source"] == "cluster.sqlite"
    assert parsed(["export", "runs.csv"])["csv"] == "runs.csv"
    assert set(parsed(["list"])) == {"command", "plugin"}
    assert "seeds" not in parsed(["report"]) and "data_root" not in parsed(["cost"])
    known = run_suite.options()
    used = {name for c in run_suite.COMMANDS.values() for name in c.options}
    assert used == set(known)  # every option belongs to some command, every command's option exists


@pytest.mark.parametrize("argv, says", [
    (["report", "--seeds", "3"], "report does not take --seeds (sweep, dry-run, reference take it"),
    (["export", "runs.csv", "--data-root", "data"], "export does not take --data-root (sweep, dry-run, fetch, check, reference take it"),
    (["list", "--quiet"], "list does not take --quiet"),
    (["publish", "--workers", "2"], "publish does not take --workers"),
    (["--smoke", "--protocols", "cifar100-10t"], "--smoke is a command now: python run_suite.py smoke"),
    (["--cost", "--profile"], "--cost is a command now: python run_suite.py cost"),
    (["--export", "runs.csv"], "--export is a command now: python run_suite.py export FILE.csv"),
    (["--methods", "l2p", "--dry-run"], "--dry-run is a command now: python run_suite.py dry-run"),
    (["smoke", "--smoke-tasks", "2"], "--smoke-tasks is a command now: python run_suite.py smoke --tasks K"),
    (["report", "publish"], "unrecognized arguments: publish"),
])
def test_an_option_a_command_does_not_use_is_refused_in_one_line(argv, says, capsys, tmp_path, monkeypatch):
    """Never silently ignored, and never two modes at once: one `error:` line, exit 2, nothing run."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_suite.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and says in err, err
    assert not list(tmp_path.iterdir())  # no store, no page, no record


def test_a_command_is_one_function(monkeypatch, capsys):
    """How `fetch` or `check` will be added: a function registered with its name, help and options."""
    monkeypatch.setattr(run_suite, "COMMANDS", dict(run_suite.COMMANDS))

    @run_suite.command("echo", "print the records folder", ("records_dir",))
    def cmd_echo(args):
        print(run_suite.records_dir(args))
        return 0

    assert run_suite.main(["echo", "--records-dir", "elsewhere"]) == 0
    assert capsys.readouterr().out == "elsewhere\n"
    with pytest.raises(SystemExit):
        run_suite.main(["echo", "--seeds", "2"])
    assert "echo does not take --seeds" in capsys.readouterr().err


def test_a_sweep_on_three_real_protocols_with_nothing_present_names_every_piece(tmp_path, capsys):
    """Nothing there: one message names every missing data set and checkpoint (and the command that
    fetches them), the sweep refuses to start, and no store is created. (The dry run prints the same
    message before its estimate, which on this CPU would profile ViT-B/16 first: not run here.)"""
    store = tmp_path / "runs.sqlite"
    common = ["--protocols", "cifar100-10t,imagenet-r-10t,cub200-10t", "--backbones", "sup21k",
              "--data-root", str(tmp_path / "data"), "--weights-dir", str(tmp_path / "w"),
              "--store", str(store), "--seeds", "1"]
    for argv in (["sweep", *common, "--no-render"],):
        assert run_suite.main(argv) == 2
        text = capsys.readouterr().err
        assert text.count("\n") == 1 and text.startswith("error: ")
        for piece in ("CIFAR-100", "ImageNet-R", "CUB-200-2011", "weights sup21k", "run_suite.py fetch"):
            assert piece in text, piece
        assert not store.exists()
