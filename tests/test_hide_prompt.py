"""HiDe-Prompt on the tiny ViT: per-sample task-identity routing, the two stages task by task,
contrastive term, prompt carry-over, batch-size invariance under TII routing, and the ViT-B/16
parameter counts by component (on the meta device). What every method must do is in
test_methods.py."""
import pytest
import torch
import torch.nn.functional as F

from methods import registry
from methods.hide_prompt import HiDeHparams, HiDeModel

from helpers import PROTOCOLS, stream, hparams, vit_b16

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(vit):
    """A HiDe strategy trained on 2 tasks x 2 classes (stage 1 and 2 of each, alternating)."""
    bm = stream()
    torch.manual_seed(0)
    hp = hparams("hide_prompt", "fmnist-5t", {
        "epochs": 1, "batch_size": 8, "tii_epochs": 15, "tii_batch_size": 8, "tii_lr": 1e-2,
        "n_centroids": 2, "tap_epochs": 3, "tii_cache_features": False})
    s = registry.create("hide_prompt", vit=vit, num_classes=4, hparams=hp, eval_mb_size=32)
    snapshots = {}
    s.train(bm.train_stream[0])
    snapshots["after0"] = s.model.prompts.detach().clone()
    s.train(bm.train_stream[1])
    snapshots["after1"] = s.model.prompts.detach().clone()
    return s, bm, snapshots


def test_task_identity_picks_the_right_prompt_per_sample(trained):
    s, bm, _ = trained
    m = s.model.eval()
    test = bm.test_stream
    x = torch.cat([torch.stack([test[t].dataset.eval()[i][0] for i in range(8)]) for t in (0, 1)])
    true_task = torch.tensor([0] * 8 + [1] * 8)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(0))  # interleave the tasks
    x, true_task = x[perm], true_task[perm]
    with torch.no_grad():
        task = m.predict_task(x)
        assert (task == true_task).float().mean() >= 0.9  # the TII model learned the tasks
        assert set(task.tolist()) == {0, 1}  # one batch, two different prompts
        batch = m(x)
        alone = torch.cat([m(x[i:i + 1]) for i in range(16)])
        explicit = m.head(m.prompted(x, m.prompts[task]))
        one_prompt = m.head(m.prompted(x, m.prompts[0]))
    assert torch.equal(m.last_task, task[-1:])  # the last call was a single sample
    assert torch.allclose(batch, alone, atol=1e-5)  # each sample as if it were alone
    assert torch.allclose(batch, explicit, atol=1e-5)  # with its own predicted task's prompt
    assert not torch.allclose(batch[task == 1], one_prompt[task == 1], atol=1e-3)


def test_evaluation_does_not_depend_on_batch_size(trained):
    s, bm, _ = trained
    res = {}
    for mb in (1, 3, 32):
        s.eval_mb_size = mb
        r = s.eval(bm.test_stream)
        res[mb] = [r[f"Top1_Acc_Exp/eval_phase/test_stream/Exp{j:03d}"] for j in range(2)]
    assert res[1] == res[3] == res[32]


def test_two_stages_and_prompt_carry_over(trained):
    s, _, snap = trained
    m = s.model
    assert m.class_task.tolist() == [0, 0, 1, 1]
    assert s.tii_alignment.stats.classes() == [0, 1, 2, 3] and s.tap.stats.classes() == [0, 1, 2, 3]
    assert s.tap.stats.means([0]).shape == (2, 64)  # 2 centroids per class
    # task 0's prompt is frozen while task 1 trains; slots of future tasks are untouched
    assert torch.equal(snap["after1"][0], snap["after0"][0])
    assert torch.equal(snap["after1"][2:], snap["after0"][2:])
    # task 1 started from task 0's prompt: it stayed much closer to it than to a fresh slot
    d_prev = (snap["after1"][1] - snap["after0"][0]).norm()
    d_fresh = (snap["after1"][2] - snap["after0"][0]).norm()
    assert d_prev < 0.5 * d_fresh


def test_contrastive_term_matches_the_definition(trained):
    s, _, _ = trained
    f = torch.randn(5, 64, requires_grad=True)
    s.model.last_features = f
    s.current_classes, s.seen_classes = [2, 3], [0, 1, 2, 3]
    protos = s.tap.stats.means([0, 1])
    M = torch.cat([protos, f])
    expect = s.hp.reg * F.cross_entropy(M @ M.T / 0.8, torch.arange(M.shape[0]))
    got = s.aux_loss()
    assert torch.allclose(got, expect)
    got.backward()
    assert f.grad.abs().sum() > 0
    s.current_classes, s.seen_classes = [0, 1], [0, 1]  # first task: batch features only
    expect0 = s.hp.reg * F.cross_entropy(f @ f.T / 0.8, torch.arange(5))
    assert torch.allclose(s.aux_loss(), expect0)


def test_training_forward_uses_the_blended_true_task_prompt(vit):
    hp = HiDeHparams(prompt_layers=[0, 1], pool_size=3, prompt_momentum=0.25)
    m = HiDeModel(vit, 4, hp).train()
    m.task_id = 2
    x = torch.rand(2, 1, 28, 28)
    blend = 0.75 * m.prompts[2] + 0.25 * m.prompts[:2].mean(0)
    assert torch.allclose(m.features(x), m.prompted(x, blend.detach()), atol=1e-6)
    # a random readout: the plain sum of a LayerNorm output has (up to rounding) zero gradient
    readout = torch.randn(vit.embed_dim, generator=torch.Generator().manual_seed(0))
    (m.features(x) @ readout).sum().backward()
    assert m.prompts.grad[2].abs().sum() > 0 and m.prompts.grad[:2].abs().sum() == 0


def test_more_tasks_than_prompts_is_a_clear_error(vit):
    bm = stream(n_classes=6, per_task=2, train=4, test=2)
    hp = hparams("hide_prompt", "fmnist-5t", {
        "pool_size": 2, "epochs": 1, "tii_epochs": 1, "tap_epochs": 1, "tii_align_epochs": 1})
    s = registry.create("hide_prompt", vit=vit, num_classes=6, hparams=hp)
    s.train(bm.train_stream[0])
    s.train(bm.train_stream[1])
    with pytest.raises(ValueError, match="pool_size"):
        s.train(bm.train_stream[2])


def test_one_prompt_per_task_in_every_protocol_and_two_passes():
    cls = registry.get("hide_prompt")
    tasks = {"cifar100-10t": 10, "imagenet-r-5t": 5, "imagenet-r-10t": 10, "imagenet-r-20t": 20,
             "cub200-10t": 10, "fmnist-5t": 5}
    for p in PROTOCOLS:
        hp = hparams("hide_prompt", p)
        assert hp["pool_size"] == tasks[p]
    assert hparams("hide_prompt", "cifar100-10t")["prompt_length"] == 5
    assert hparams("hide_prompt", "imagenet-r-10t")["prompt_length"] == 20
    assert (cls.passes_train, cls.passes_test) == (2, 2)


def test_vit_b16_parameter_counts():
    vit_b = vit_b16()  # meta device: shapes only
    counts = {}
    for protocol, classes in (("cifar100-10t", 100), ("imagenet-r-10t", 200)):
        m = HiDeModel(vit_b, classes, HiDeHparams(**hparams("hide_prompt", protocol)))
        counts[protocol] = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("tii") else ""):
                            0 for n, _ in m.added_parameters()}
        for n, p in m.added_parameters():
            key = n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("tii") else "")
            counts[protocol][key] += p.numel()
    assert counts["cifar100-10t"]["prompts"] == 384_000
    assert counts["imagenet-r-10t"]["prompts"] == 1_536_000
    for c in counts.values():
        assert c["tii.mlp"] + c["tii.norm"] == 2_363_136
    assert counts["cifar100-10t"]["tii.head"] == 76_900
    assert counts["imagenet-r-10t"]["tii.head"] == 153_800
    assert sum(counts["cifar100-10t"].values()) == 384_000 + 2_363_136 + 76_900
