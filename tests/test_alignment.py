"""methods.alignment: class statistics, sampling and the classifier re-fit, on synthetic features."""
import torch
import torch.nn.functional as F
from torch import nn

import pytest

from methods import registry
from methods.alignment import (AlignmentConfig, AlignmentStage, ClassStatistics, align_classifier,
                               collect_features, kmeans)

torch.set_num_threads(1)
D = 16


def gaussian_classes(n_classes: int, n: int, seed: int, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(n_classes, D, generator=torch.Generator().manual_seed(123)) * 2.5
    x = centers.repeat_interleave(n, 0) + spread * torch.randn(n_classes * n, D, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n)
    return x, y


def accuracy(head, x, y, classes):
    mask = torch.zeros(head.out_features, dtype=torch.bool)
    mask[classes] = True
    with torch.no_grad():
        return (head(x).masked_fill(~mask, float("-inf")).argmax(1) == y).float().mean().item()


def test_statistics_match_moments_and_sampling_is_seeded():
    x, y = gaussian_classes(3, 400, seed=0)
    st = ClassStatistics("diag", n_centroids=1)
    st.update(x, y)
    assert st.classes() == [0, 1, 2]
    assert torch.allclose(st.means([1])[0], x[y == 1].mean(0), atol=1e-5)
    xs, ys = st.sample([0, 2], 1000, torch.Generator().manual_seed(1))
    assert xs.shape == (2000, D) and ys.tolist() == [0] * 1000 + [2] * 1000
    assert torch.allclose(xs[ys == 2].mean(0), x[y == 2].mean(0), atol=0.15)
    assert torch.allclose(xs[ys == 2].var(0), x[y == 2].var(0) + 1e-4, rtol=0.2)
    again, _ = st.sample([0, 2], 1000, torch.Generator().manual_seed(1))
    assert torch.equal(xs, again)
    # re-updating one class leaves the others alone
    st.update(x[y == 0] + 10.0, y[y == 0])
    assert torch.allclose(st.means([0])[0], x[y == 0].mean(0) + 10.0, atol=1e-4)
    assert torch.allclose(st.means([1])[0], x[y == 1].mean(0), atol=1e-5)


def test_full_covariance_reproduces_correlation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3000, 1, generator=g)
    x = torch.cat([z, 2 * z + 0.1 * torch.randn(3000, 1, generator=g)], 1)
    st = ClassStatistics("full")
    st.update(x, torch.zeros(3000, dtype=torch.long))
    xs, _ = st.sample([0], 4000, torch.Generator().manual_seed(2))
    corr = torch.corrcoef(xs.T)[0, 1]
    assert corr > 0.98
    diag = ClassStatistics("diag")
    diag.update(x, torch.zeros(3000, dtype=torch.long))
    xd, _ = diag.sample([0], 4000, torch.Generator().manual_seed(2))
    assert abs(torch.corrcoef(xd.T)[0, 1]) < 0.1


def test_kmeans_finds_separated_clusters_and_multicentroid_sampling():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0] * D, [8.0] * D, [-8.0] * D])
    x = centers.repeat_interleave(50, 0) + 0.3 * torch.randn(150, D, generator=g)
    c, assign = kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    found = sorted(round(v) for v in c[:, 0].tolist())
    assert found == [-8, 0, 8]
    assert len(set(assign[:50].tolist())) == 1 and len(set(assign.tolist())) == 3
    st = ClassStatistics("diag", n_centroids=3)
    st.update(x, torch.zeros(150, dtype=torch.long))
    assert st.means().shape == (3, D)
    xs, _ = st.sample([0], 30, torch.Generator().manual_seed(0))
    near = torch.cdist(xs, centers).argmin(1)
    assert torch.bincount(near, minlength=3).tolist() == [10, 10, 10]  # equal count per centroid
    # fewer points than centroids: one centroid per point
    st.update(x[:2], torch.ones(2, dtype=torch.long))
    assert st.means([1]).shape == (2, D)


def test_state_dict_round_trip():
    x, y = gaussian_classes(2, 50, seed=3)
    st = ClassStatistics("diag", n_centroids=2, eps=1e-3)
    st.update(x, y)
    other = ClassStatistics()
    other.load_state_dict(st.state_dict())
    assert other.classes() == [0, 1] and other.n_centroids == 2 and other.eps == 1e-3
    a, _ = st.sample([0, 1], 8, torch.Generator().manual_seed(0))
    b, _ = other.sample([0, 1], 8, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_collect_features_is_no_grad_on_cpu():
    lin = nn.Linear(D, 4)
    batches = [(torch.randn(5, D), torch.arange(5)), (torch.randn(3, D), torch.arange(3))]
    f, y = collect_features(lin, batches)
    assert f.shape == (8, 4) and not f.requires_grad and y.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]


def test_alignment_fixes_a_head_biased_toward_the_newest_task():
    """Task 0 = classes 0,1; task 1 = classes 2,3, trained with masked CE (old logits -inf): the
    old rows go stale and their norms lag, so old classes get predicted as new ones. Re-fitting
    on samples from the stored statistics restores old-class accuracy, without any real images."""
    torch.manual_seed(0)
    x, y = gaussian_classes(4, 200, seed=0, spread=1.5)
    xt, yt = gaussian_classes(4, 200, seed=1, spread=1.5)
    head = nn.Linear(D, 4)
    opt = torch.optim.SGD(head.parameters(), lr=0.05)
    for task in ([0, 1], [2, 3]):
        keep = (y == task[0]) | (y == task[1])
        mask = torch.zeros(4, dtype=torch.bool)
        mask[task] = True
        for _ in range(100 if task == [0, 1] else 400):
            loss = F.cross_entropy(head(x[keep]).masked_fill(~mask, float("-inf")), y[keep])
            opt.zero_grad()
            loss.backward()
            opt.step()
    # the bias: old classes are mostly predicted as new ones
    old = (yt <= 1)
    before_old = accuracy(head, xt[old], yt[old], [0, 1, 2, 3])
    st = ClassStatistics("diag")
    st.update(x, y)
    cfg = AlignmentConfig(epochs=10, samples_per_class=128, batch_size=64, lr=0.01, optimizer="sgd")
    align_classifier(head, st, [0, 1, 2, 3], cfg, generator=torch.Generator().manual_seed(0))
    after_old = accuracy(head, xt[old], yt[old], [0, 1, 2, 3])
    after_all = accuracy(head, xt, yt, [0, 1, 2, 3])
    assert before_old < 0.8, before_old
    assert after_old > before_old + 0.2, (before_old, after_old)
    assert after_all > 0.95, after_all


def test_alignment_trains_only_seen_classes_and_respects_mask():
    x, y = gaussian_classes(3, 100, seed=0)
    st = ClassStatistics()
    st.update(x, y)
    head = nn.Linear(D, 5)
    unseen_before = head.weight[3:].clone()
    cfg = AlignmentConfig(epochs=2, samples_per_class=32, batch_size=32, iters_per_epoch=2,
                          optimizer="adamw", lr=1e-2, weight_decay=0.0)
    align_classifier(head, st, [0, 1, 2], cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(head.weight[3:], unseen_before)  # -inf logits: no gradient to unseen rows
    assert head.training  # the mode is restored


@pytest.mark.parametrize("own_generator", [False, True])
def test_stage_is_statistics_then_a_refit_with_one_step_per_old_class(own_generator):
    """`AlignmentStage.after_task` is exactly: update the statistics, then (old classes only)
    `align_classifier` over the seen classes with one iteration per old class and epoch, drawing
    from the stage's generator or from a fresh one seeded from the global RNG."""
    cfg = AlignmentConfig(epochs=3, samples_per_class=8, batch_size=8, lr=0.05, optimizer="adamw",
                          weight_decay=5e-4, min_lr=1e-3)
    x, y = gaussian_classes(4, 30, seed=0)
    torch.manual_seed(5)
    head = nn.Linear(D, 4)
    by_hand = nn.Linear(D, 4)
    by_hand.load_state_dict(head.state_dict())
    stage = AlignmentStage(cfg, n_centroids=2, seed=3,
                           generator=torch.Generator().manual_seed(9) if own_generator else None)
    stats = ClassStatistics("diag", n_centroids=2, seed=3)
    own = torch.Generator().manual_seed(9)
    steps = []
    for task, (seen, current) in enumerate((([0, 1], [0, 1]), ([0, 1, 2, 3], [2, 3]))):
        part = (y == current[0]) | (y == current[1])
        torch.manual_seed(100 + task)
        before = head.weight.detach().clone()
        refit = stage.after_task(head, x[part], y[part], seen, current)
        assert refit == (task == 1) and stage.stats.classes() == seen
        assert torch.equal(head.weight, before) != refit
        torch.manual_seed(100 + task)
        stats.update(x[part], y[part])
        if task == 1:
            gen = own if own_generator else torch.Generator().manual_seed(int(torch.randint(2 ** 31 - 1, (1,))))
            opt_step = torch.optim.AdamW.step

            def counted(self, *a, **k):
                steps.append(1)
                return opt_step(self, *a, **k)
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(torch.optim.AdamW, "step", counted)
                align_classifier(by_hand, stats, seen, AlignmentConfig(**{**vars(cfg), "iters_per_epoch": 2}),
                                 generator=gen)
    assert torch.equal(head.weight, by_hand.weight) and torch.equal(head.bias, by_hand.bias)
    assert len(steps) == cfg.epochs * 2  # 2 old classes: 2 steps per epoch


@pytest.mark.parametrize("name,stages", [("hide_prompt", ("tii_alignment", "tap")),
                                         ("vq_prompt", ("alignment",)), ("smope", ("alignment",))])
def test_the_methods_hold_the_shared_stage_with_their_own_knobs(tiny, name, stages):
    """HiDe (TII model and main head), VQ and SMoPE set the stage up from their hyperparameters."""
    from helpers import hparams

    hp = hparams(name, "fmnist-5t")
    s = registry.create(name, vit=tiny, num_classes=10, hparams=hp)
    held = [getattr(s, a) for a in stages]
    assert all(isinstance(stage, AlignmentStage) for stage in held)
    knobs = {"hide_prompt": ("tii_align_epochs", "tap_epochs"), "vq_prompt": ("align_epochs",),
             "smope": ("ca_epochs",)}[name]
    assert tuple(stage.config.epochs for stage in held) == tuple(hp[k] for k in knobs)
