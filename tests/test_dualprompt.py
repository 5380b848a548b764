"""DualPrompt on the tiny ViT with synthetic data: task-id E-prompt in training, per-sample top-1
at test, E-prompt carried over to the next task, batch-size-invariant evaluation with mixed
E-prompts. What every method must do (defaults for every protocol, the stream run, the frozen
backbone, the optimizer groups, the ViT-B/16 counts) is in test_methods.py."""
import pytest
import torch

from helpers import assert_batch_size_invariant, make_strategy, hparams, train_and_probe
from test_l2p import five_tasks  # the synthetic 5 x 2-class stream

torch.set_num_threads(1)


def make(tiny, **over):
    return make_strategy("dualprompt", tiny, **over)


def test_defaults_follow_the_stream_and_the_code():
    assert hparams("dualprompt", "imagenet-r-20t")["pool_size"] == 20  # one E-prompt per task
    assert hparams("dualprompt", "cifar100-10t")["prompt_lr_mult"] == 1.0  # one lr, as the code


def test_selection_task_id_in_training_top1_per_sample_at_test(tiny):
    model = make(tiny).model
    x = torch.randn(8, 1, 28, 28)
    q = tiny.query(x)
    model.task_id = 2
    model.train()
    assert model.select(q).tolist() == [2] * 8
    model.eval()
    with torch.no_grad():  # queries of a random-init ViT are nearly parallel: aim tasks 0-2's keys
        model.e_key[:3].copy_(q[:3])
    idx = model.select(q)
    sim = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(model.e_key, dim=-1).t()
    assert idx.shape == (8,)
    assert torch.equal(idx, sim[:, :3].argmax(1))  # only keys of tasks 0..2 compete
    assert len(set(idx.tolist())) > 1, "the keys should give different choices across samples"
    prefix = model.prefixes(idx)
    assert sorted(prefix) == [0, 1, 2, 3, 4]
    assert prefix[0][0].shape == (5, tiny.embed_dim)  # G: shared, 5 key tokens
    assert prefix[2][0].shape == (8, 5, tiny.embed_dim)  # E: per sample
    for b in range(8):  # sample b gets its own E-prompt, keys and values kept apart
        assert torch.equal(prefix[3][0][b], model.e_prompt[1, idx[b], 0])
        assert torch.equal(prefix[3][1][b], model.e_prompt[1, idx[b], 1])
    # changing an E-prompt that sample a did not pick leaves its feature unchanged
    feats = model.features(x)
    a = 0
    j = next(i for i in idx.tolist() if i != idx[a].item())
    with torch.no_grad():
        model.e_prompt[:, j] += torch.randn_like(model.e_prompt[:, j])
        after = model.features(x)
    assert torch.allclose(after[a], feats[a], atol=1e-6)
    changed = (idx == j).nonzero().flatten()
    assert not torch.allclose(after[changed], feats[changed], atol=1e-4)


def test_e_prompt_carried_over_old_ones_kept_and_backbone_frozen(tiny):
    s = make(tiny, epochs=1, batch_size=8)
    bm = five_tasks(per_class=8)
    before = s.model.e_prompt.detach().clone()
    key_before = s.model.e_key.detach().clone()
    s.train(bm.train_stream[0])
    e0 = s.model.e_prompt.detach().clone()
    assert not torch.equal(e0[:, 0], before[:, 0])  # task 0's E-prompt learnt
    assert torch.equal(e0[:, 1:], before[:, 1:])  # the others untouched
    s.experience, s.task_id = bm.train_stream[1], 1
    s.task_start()
    assert torch.equal(s.model.e_prompt[:, 1], e0[:, 0])  # new E-prompt = previous one
    assert not torch.equal(s.model.e_key[1], s.model.e_key[0])  # keys are not copied
    s.train(bm.train_stream[1])
    assert torch.equal(s.model.e_prompt[:, 0], e0[:, 0])  # task 0's E-prompt kept
    assert not torch.equal(s.model.e_key[1], key_before[1])  # task 1's key pulled
    # one explicit backward in task 1: grads on G, E/key row 1 and the head only
    s.model.train()
    s.model.zero_grad()
    x = bm.train_stream[1].dataset[0][0][None]
    loss = s.model(x)[:, 2:4].logsumexp(1).sum() + s.model.pull
    loss.backward()
    g = s.model.e_prompt.grad.abs().flatten(2).sum(-1)  # (layers, pool)
    assert (g[:, 1] > 0).all() and (g[:, [0, 2, 3, 4]] == 0).all()
    kg = s.model.e_key.grad.abs().sum(1)
    assert kg[1] > 0 and (kg[[0, 2, 3, 4]] == 0).all()
    assert s.model.g_prompt.grad.abs().sum() > 0 and s.model.head.weight.grad.abs().sum() > 0


def test_a_batch_mixing_e_prompts_is_batch_size_invariant(tiny):
    s = make(tiny, epochs=1, batch_size=8)
    bm = five_tasks()
    x = train_and_probe(s, bm)  # trains all tasks, checks each evaluation
    s.model.eval()
    with torch.no_grad():
        # queries of a random-init ViT are nearly parallel, so after training every image picks
        # the same key; aim each key at one test image so that the batch mixes E-prompts
        s.model.e_key.copy_(tiny.query(x[::16]))
        assert len(set(s.model.select(tiny.query(x)).tolist())) == 5
    assert_batch_size_invariant(s, x, bm.test_stream)


def test_pool_smaller_than_stream_is_an_error(tiny):
    s = make(tiny, pool_size=2, epochs=1)
    bm = five_tasks(per_class=2)
    s.train(bm.train_stream[0])
    s.train(bm.train_stream[1])
    with pytest.raises(ValueError, match="pool_size"):
        s.train(bm.train_stream[2])


def test_prompt_init_pytorch_or_flax(tiny):
    m = make(tiny).model
    assert m.e_prompt.min() < -0.5 and m.e_prompt.max() > 0.5  # U[-1, 1], dualprompt-pytorch
    m = make(tiny, prompt_init="flax").model
    for p in (m.g_prompt, m.e_prompt, m.e_key):  # U[0, 0.01), flax's uniform() as the JAX code
        assert 0 <= p.min() and p.max() < 0.01
    with pytest.raises(ValueError, match="prompt_init"):
        make(tiny, prompt_init="normal")
