"""The real-shape dry run (protocols/smoke.py). Its reduced form, run here in CI: every method
through the first 2 tasks of cifar100-10t on ViT-B/16 fed 32 px (`smoke.REDUCED_BACKBONE`, random
weights) and synthetic CIFAR-100 pickles, every per-task stage counted, and the lower bound through
the first task at the real 224 px. `PROMPTCL_SMOKE=full` (`make smoke`) runs the 2-task form at
224 px for every method instead. The rest checks what makes a dry run the real shape and never a
result."""
import math
import os
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

from benchmarks import build_stream
from benchmarks.synthetic import write_fashion_mnist
from leaderboard.store import RunStore
from helpers import added_params, vit_b16_strategy
from methods import alignment, backbones, hide_prompt, registry, smope
from methods.alignment import ClassStatistics
from methods.base import PromptStrategy
from protocols import smoke
from protocols.errors import SweepError
from protocols.runner import RunOptions, RunSpec, method_hparams, run, variant
from protocols.schema import ProtocolError, available, load_protocol, validate

SMOKE_FIELDS = ("kind", "created", "device", "protocol", "backbone", "method", "tasks", "wall_s",
                "complete", "versions")
#: `PROMPTCL_SMOKE=full` (`make smoke`): every method through both tasks at the real 224 px
FULL = os.environ.get("PROMPTCL_SMOKE") == "full"
#: the backbone every method runs on here
BACKBONE = smoke.BACKBONE if FULL else smoke.REDUCED_BACKBONE


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The form run here, once: every registered method through cifar100-10t's first 2 tasks, one
    train and one test image per class, on `BACKBONE`; in the reduced form, also the lower bound
    through the first task at 224 px (returned apart). The per-task stages are counted as they
    run."""
    tmp = tmp_path_factory.mktemp("smoke")
    stages: dict[str, Counter] = defaultdict(Counter)
    current: dict[str, str] = {}

    def counting(owner, name, stage):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            stages[current["method"]][stage] += 1
            return original(*args, **kwargs)
        return original, wrapper

    def after_task(self, **kw):
        stages[current["method"]][f"task_end:{self.task_id}"] += 1
        return after_original(self, **kw)

    def dense_forward(self, x):
        if self.dense:
            stages[current["method"]]["dense_forward"] += 1
        return features_original(self, x)

    after_original = PromptStrategy._after_training_exp
    features_original = smope.SMoPEModel.features
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PromptStrategy, "_after_training_exp", after_task)
        mp.setattr(smope.SMoPEModel, "features", dense_forward)
        mp.setattr(ClassStatistics, "update", counting(ClassStatistics, "update", "statistics")[1])
        mp.setattr(alignment, "align_classifier", counting(alignment, "align_classifier", "alignment")[1])
        mp.setattr(hide_prompt.HiDePrompt, "_train_tii",
                   counting(hide_prompt.HiDePrompt, "_train_tii", "tii")[1])
        store = RunStore(tmp / "smoke.sqlite")
        runs = []
        for method in registry.names():
            current["method"] = method
            runs += list(smoke.run_smoke(["cifar100-10t"], [method], store=store,
                                         data_root=tmp / "data", tasks=2, train_per_class=1,
                                         test_per_class=1, threads=None, backbone=BACKBONE))
        current["method"] = "224 px"
        full_size = [] if FULL else list(smoke.run_smoke(
            ["cifar100-10t"], ["head_only"], store=RunStore(tmp / "224.sqlite"),
            data_root=tmp / "data-224", tasks=1, train_per_class=1, test_per_class=1,
            threads=None, backbone=smoke.BACKBONE))
    return runs, store, stages, full_size


def test_every_method_lands_a_complete_two_task_record(dry_run):
    runs, store, _, _ = dry_run
    assert [r.spec.method for r in runs] == registry.names()
    for r in runs:
        assert r.error is None, r.error
        assert r.smoke["complete"] is True
        rec = store.get(r.record["key"])
        assert rec is not None and rec["status"] == "ok" and rec["protocol"] == "cifar100-10t"
        acc = rec["acc_matrix"]
        assert len(acc) == 2 and all(len(row) == 2 for row in acc) and acc[1][0] is None
        assert all(math.isfinite(acc[j][i]) for i in range(2) for j in range(i + 1))
        assert all(math.isfinite(rec["metrics"][m]) for m in ("faa", "caa", "ffm", "bwt", "final_acc"))
        # real shape: 100 classes in 10 tasks of 10, ViT-B/16 with random weights, and what the
        # method adds to it exactly as on ViT-B/16 at 224 px (counted on the meta device)
        assert [len(c) for c in rec["classes_per_task"]] == [10] * 10
        assert len(rec["class_order"]) == 100 and rec["backbone"] == BACKBONE
        assert rec["backbone_sha256"] == "random-init" and rec["spec"]["protocol"]["num_tasks"] == 10
        real = vit_b16_strategy(rec["method"], "cifar100-10t", 100).model
        assert rec["cost"]["trainable_params"] == added_params(real)
        assert rec["cost"]["head_params"] == 768 * 100 + 100


def test_the_reduced_form_feeds_vit_b16_32_px_and_224_px_runs_too(dry_run):
    """The reduced form: the real ViT-B/16 (12 blocks of 768, 12 heads) on a 2 x 2 patch grid;
    the lower bound's run at 224 px goes through the full-resolution input path."""
    runs, _, _, full_size = dry_run
    spec = backbones.get_spec(BACKBONE)
    assert spec.arch["embed_dim"] == 768 and spec.arch["depth"] == 12 and spec.arch["num_heads"] == 12
    assert spec.image_size == (224 if FULL else 32)
    if FULL:
        assert not full_size
        return
    (run224,) = full_size
    assert run224.error is None, run224.error
    rec = run224.record
    assert run224.smoke["complete"] and rec["backbone"] == "sup21k" and len(rec["acc_matrix"]) == 1
    assert backbones.get_spec(rec["backbone"]).image_size == 224
    # the cost row counts FLOPs at the input size: 224 px is (197 / 5 tokens) far more per image
    reduced = next(r.record for r in runs if r.spec.method == "head_only")
    assert rec["cost"]["gflops_test"] > 30 * reduced["cost"]["gflops_test"]


def test_the_records_cannot_pass_for_results(dry_run):
    runs, store, _, _ = dry_run
    for r in runs:
        rec = r.record
        assert rec["label"] == f"{rec['method']} [smoke]"
        assert rec["variant"]["protocol.first_tasks"] == 2
        real = method_hparams(rec["method"], load_protocol("cifar100-10t"))
        over = smoke.smoke_overrides(rec["method"], "cifar100-10t")
        # only the epoch counts differ from the method's real configuration, and the variant says so
        assert rec["spec"]["hparams"] == {**real, **over}
        assert over and all(rec["variant"][k] == v for k, v in over.items())
    assert len(store) == len(runs)


def test_every_per_task_stage_ran(dry_run):
    _, _, stages, _ = dry_run
    for method in registry.names():
        if method == "joint":  # trains once on both tasks, then evaluates after each
            assert stages[method]["task_end:0"] == 1
        else:
            assert stages[method]["task_end:0"] == stages[method]["task_end:1"] == 1, method
    # HiDe: the TII model per task; its statistics (TII and TAP) per task; TII and head re-fit on task 1
    assert stages["hide_prompt"]["tii"] == 2
    assert stages["hide_prompt"]["statistics"] == 4 and stages["hide_prompt"]["alignment"] == 2
    # SMoPE: dense warm-up on task 0; statistics per task; the head re-fit on task 1
    assert stages["smope"]["dense_forward"] > 0
    assert stages["smope"]["statistics"] == 2 and stages["smope"]["alignment"] == 1
    assert stages["vq_prompt"]["statistics"] == 2 and stages["vq_prompt"]["alignment"] == 1


def test_smoke_records_have_every_field(dry_run):
    runs, _, _, full_size = dry_run
    for r in runs + full_size:
        s = r.smoke
        assert all(s.get(f) is not None for f in SMOKE_FIELDS), s
        assert s["kind"] == "smoke" and s["protocol"] == "cifar100-10t" and s["backbone"] == r.spec.backbone
        assert s["method"] == r.spec.method and s["tasks"] == len(r.record["acc_matrix"]) and s["wall_s"] > 0
        assert s["device"].startswith("cpu (") and s["versions"]["torch"] == torch.__version__
        assert s["run_key"] == r.record["key"] and s["created"] >= r.record["created"]
        assert r.line().endswith(f"complete in {s['wall_s']:.1f} s")


def test_overrides_lower_every_epoch_count_and_nothing_else():
    for proto in smoke.REAL_PROTOCOLS:
        for method in registry.names():
            real = method_hparams(method, load_protocol(proto))
            over = smoke.smoke_overrides(method, proto)
            epochs = {k for k in real if k == "epochs" or k.endswith("_epochs")}
            assert set(over) <= epochs
            for k in epochs:  # every epoch count is at its dry-run value (SMoPE: 2 for its warm-up)
                want = 2 if (method, k) == ("smope", "epochs") else 1
                assert {**real, **over}[k] == min(real[k], want), (proto, method, k)
    assert smoke.smoke_overrides("hide_prompt", "imagenet-r-10t") == {
        "epochs": 1, "tii_epochs": 1, "tap_epochs": 1, "tii_align_epochs": 1}


@pytest.mark.parametrize("name", ["imagenet-r-10t", "cub200-10t"])
def test_photo_protocols_keep_their_real_shape(tmp_path, name):
    """ImageNet-R (its split given as the list of the files written) and CUB-200 copies: the real
    class count, classes per task and stream-derived hyperparameters; real-sized JPEGs in."""
    (spec,) = smoke.smoke_specs([name], ["hide_prompt"], data_root=tmp_path, tasks=3)
    proto, real = load_protocol(spec.protocol), load_protocol(name)
    assert proto.name == name and proto.first_tasks == 3 and proto.num_tasks == real.num_tasks
    assert proto.classes_per_task == real.classes_per_task == [20] * 10
    assert method_hparams("hide_prompt", proto) == method_hparams("hide_prompt", real)
    if real.dataset == "imagenet_r":
        assert proto.split is None and proto.split_file.startswith(str(tmp_path.resolve()))
    info = build_stream(proto.dataset, data_root=tmp_path, seed=0, num_tasks=proto.num_tasks,
                        image_size=224, in_chans=3, augment=proto.augment,
                        eval_resize=proto.eval_resize, split=proto.split, split_file=proto.split_file)
    assert info.num_classes == 200 and (info.num_train, info.num_test) == (400, 200)
    x, _, *rest = info.benchmark.test_stream[0].dataset[0]
    assert tuple(x.shape) == (3, 224, 224)
    from PIL import Image
    with Image.open(next(Path(info.location).rglob("*.jpg"))) as photo:
        assert min(photo.size) >= 180  # a photo's size, not a thumbnail's
    v = variant(spec)
    assert v["protocol.first_tasks"] == 3 and v["tii_epochs"] == 1
    assert ("protocol.split_file" in v) == (real.dataset == "imagenet_r")


def test_first_tasks_runs_the_first_tasks_of_the_same_stream(tmp_path):
    """`first_tasks: k` trains and evaluates tasks 0..k-1 exactly as the full run does."""
    write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=6, test_per_class=3)
    full = tmp_path / "five.yaml"
    body = ("dataset: fashion_mnist\nnum_tasks: 5\nmethods:\n  head_only: {epochs: 1}\n"
            "  l2p: {epochs: 1, batch_size: 8, prompt_length: 2}\n")
    full.write_text("name: five\n" + body)
    part = tmp_path / "five-part.yaml"
    part.write_text("name: five\nfirst_tasks: 2\n" + body)
    options = RunOptions(data_root=str(tmp_path), weights_dir=None, random_init=True, quiet=True)
    for method in ("head_only", "l2p"):
        a = run(RunSpec(str(full), "tiny", method, 0), options)
        b = run(RunSpec(str(part), "tiny", method, 0), options)
        assert len(b["acc_matrix"]) == 2 and b["key"] != a["key"]
        assert b["acc_matrix"] == [row[:2] for row in a["acc_matrix"][:2]]
        assert b["spec"]["protocol"]["first_tasks"] == 2 and b["classes_per_task"] == a["classes_per_task"]


def test_first_tasks_is_validated_and_leaves_other_keys_alone():
    base = {"name": "x", "dataset": "cifar100", "num_tasks": 10}
    for bad in (0, 11, "2"):
        with pytest.raises(ProtocolError, match="first_tasks"):
            validate(dict(base, first_tasks=bad), "x.yaml")
    assert validate(dict(base, first_tasks=10), "x.yaml").data_spec()["first_tasks"] == 10
    for name in available():  # the keys of runs made before first_tasks existed stay the same
        assert "first_tasks" not in load_protocol(name).data_spec()


def test_clear_errors(tmp_path):
    with pytest.raises(SweepError, match="real protocols"):
        smoke.smoke_specs(["fmnist-5t"], ["l2p"], data_root=tmp_path)
    with pytest.raises(SweepError, match="tasks must be in 1..5"):
        smoke.smoke_specs(["imagenet-r-5t"], ["l2p"], data_root=tmp_path, tasks=6)
    with pytest.raises(SweepError, match="train_per_class"):
        smoke.smoke_specs(["cub200-10t"], ["l2p"], data_root=tmp_path, train_per_class=3)
    with pytest.raises(registry.UnknownMethodError, match="nope"):
        smoke.smoke_specs(["cifar100-10t"], ["nope"], data_root=tmp_path)
    with pytest.raises(backbones.BackboneError, match="multiple of sup21k's patch size 16"):
        smoke.smoke_specs(["cifar100-10t"], ["l2p"], data_root=tmp_path, backbone="sup21k@20")


def test_is_complete():
    ok = {"status": "ok", "acc_matrix": [[50.0, 40.0], [None, 60.0]],
          "metrics": {m: 1.0 for m in ("faa", "caa", "ffm", "bwt", "final_acc")}}
    assert smoke.is_complete(ok, 2)
    assert not smoke.is_complete(ok, 3)
    assert not smoke.is_complete({**ok, "acc_matrix": [[50.0, None], [None, 60.0]]}, 2)
    assert not smoke.is_complete({**ok, "acc_matrix": [[50.0, float("nan")], [None, 60.0]]}, 2)
    assert not smoke.is_complete({**ok, "metrics": {**ok["metrics"], "faa": float("nan")}}, 2)
    assert not smoke.is_complete({**ok, "status": "failed"}, 2)
