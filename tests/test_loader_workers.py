"""The data pipeline: results do not depend on the DataLoader worker count, random augmentation
included, and the loader-workers setting reaches every DataLoader of a run."""

from __future__ import annotations

import pytest
import torch

import methods.base
from benchmarks import build_stream
from benchmarks.synthetic import write_imagenet_r
from methods import loading
from methods.loading import default_loader_workers, make_loader

torch.set_num_threads(1)

AUGMENTED = dict(image_size=28, in_chans=1, augment="rrc_flip")  # random crop + flip at 28 px


WNIDS = ("n01443537", "n01484850", "n01494475", "n01496331")


@pytest.fixture(scope="module")
def inr_root(tmp_path_factory):
    """4 ImageNet-R classes of 12 small JPEGs (stratified split: 10 train / 2 test each)."""
    root = tmp_path_factory.mktemp("inr")
    write_imagenet_r(root, WNIDS, per_class=12)
    return root


def _stream(root):
    return build_stream("imagenet_r", data_root=root, seed=0, num_tasks=2, split="stratified", **AUGMENTED)


def _passes(loader, n: int, seed: int = 5):
    """Every batch of ``n`` passes under a fixed global seed, and the global RNG state after."""
    torch.manual_seed(seed)
    batches = [[t.clone() for t in b] for _ in range(n) for b in loader]
    return batches, torch.get_rng_state()


def _same(a, b) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x, y) for x, y in zip(u, v)) for u, v in zip(a, b))


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_and_global_rng_do_not_depend_on_workers(inr_root, shuffle):
    ds = _stream(inr_root).benchmark.train_stream[0].dataset.train()
    ref, ref_state = _passes(make_loader(ds, batch_size=8, shuffle=shuffle), 3)
    n = len(ref) // 3
    assert not _same(ref[:n], ref[n:2 * n])  # the augmentation is random: passes differ
    for workers, persistent in ((1, False), (2, False), (2, True)):
        got, state = _passes(make_loader(ds, batch_size=8, shuffle=shuffle, workers=workers,
                                         persistent=persistent), 3)
        assert _same(got, ref), (workers, persistent)
        assert torch.equal(state, ref_state), (workers, persistent)  # later draws unchanged too
    # what the plain DataLoader does: workers change the augmented pixels (the trap avoided here)
    plain0, _ = _passes(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=shuffle), 1)
    plain2, _ = _passes(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=shuffle, num_workers=2), 1)
    assert not _same(plain0, plain2)


SMOPE = dict(epochs=2, batch_size=8, ca_epochs=2)


def _train(vit, root, workers: int):
    """SMoPE through both tasks: its accuracy matrix and everything it learned."""
    from avalanche.training.determinism.rng_manager import RNGManager
    from methods import registry

    bm = _stream(root).benchmark
    RNGManager.set_random_seeds(0)
    s = registry.create("smope", vit=vit, num_classes=4, hparams=registry.resolve_hparams("smope", "x", SMOPE),
                        loader_workers=workers)
    acc = []
    for i, exp in enumerate(bm.train_stream):
        s.train(exp)
        res = s.eval(bm.test_stream[:i + 1])
        acc.append([res[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(i + 1)])
    return acc, s.model.method_state_dict()


def test_training_with_random_augmentation_is_the_same_with_0_and_2_workers(tiny, inr_root, monkeypatch):
    """SMoPE (training epochs, its counting and statistics passes over augmented images, the
    alignment, evaluation) on 2 tasks with RandomResizedCrop + flip: the same accuracy matrix
    and bit-identical learned parameters with 0 and 2 workers."""
    acc0, state0 = _train(tiny, inr_root, 0)
    acc2, state2 = _train(tiny, inr_root, 2)
    assert acc2 == acc0
    assert state0.keys() == state2.keys() and all(torch.equal(state0[k], state2[k]) for k in state0)
    # control: other augmentation draws (everything else the same) do change what is learned
    real = loading.sample_seed
    monkeypatch.setattr(loading, "sample_seed", lambda s, i: real(s + 1, i))
    _, other = _train(tiny, inr_root, 0)
    assert not all(torch.equal(state0[k], other[k]) for k in state0)


def test_the_run_option_reaches_every_loader(inr_root, tmp_path, monkeypatch):
    """`RunOptions.loader_workers` reaches training (shuffled, persistent over epochs), evaluation
    and the per-task stages, and the record is the 0-worker one."""
    from protocols.runner import RunOptions, RunSpec, run

    yaml = tmp_path / "inr-2t.yaml"
    yaml.write_text("name: inr-2t\ndataset: imagenet_r\nnum_tasks: 2\naugment: rrc_flip\nsplit: stratified\n"
                    f"backbones: [tiny]\nmethods: {{smope: {SMOPE}}}\n".replace("'", ""))
    records, seen = {}, {0: [], 2: []}
    for workers in (0, 2):
        def spy(dataset, **kw):
            seen[workers].append((kw["workers"], kw.get("shuffle", False), kw.get("persistent", False)))
            return loading.make_loader(dataset, **kw)

        monkeypatch.setattr(methods.base, "make_loader", spy)
        records[workers] = run(RunSpec(str(yaml), "tiny", "smope", 0), RunOptions(
            data_root=str(inr_root), random_init=True, quiet=True, threads=1, loader_workers=workers))
    for k in ("key", "acc_matrix", "per_class_acc", "metrics", "data_hash"):
        assert records[2][k] == records[0][k], k
    assert {w for w, _, _ in seen[0]} == {0} and {w for w, _, _ in seen[2]} == {2}
    assert (2, True, True) in seen[2] and (2, False, False) in seen[2] and len(seen[2]) == len(seen[0]) >= 7


def test_default_workers_follow_the_device(monkeypatch):
    assert default_loader_workers("cpu") == 0
    monkeypatch.setattr(loading, "usable_cpus", lambda: 16)
    assert default_loader_workers("cuda") == 8 and default_loader_workers(torch.device("cuda:1")) == 8
    monkeypatch.setattr(loading, "usable_cpus", lambda: 4)
    assert default_loader_workers("cuda") == 3
    monkeypatch.setattr(loading, "usable_cpus", lambda: 1)
    assert default_loader_workers("cuda") == 0


def test_strategy_takes_the_setting(tiny):
    from methods import registry

    s = registry.create("head_only", vit=tiny, num_classes=10)
    assert s.loader_workers == 0 and s.pin_memory is False  # CPU defaults
    assert registry.create("head_only", vit=tiny, num_classes=10, loader_workers=3).loader_workers == 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="loader_workers"):
            registry.create("head_only", vit=tiny, num_classes=10, loader_workers=bad)
