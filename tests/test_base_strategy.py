"""The shared head of `PromptStrategy`: why it starts at zero (see `methods.base.PromptModel`)."""
import torch

from helpers import make_strategy, stream


def test_masked_ce_never_moves_the_sum_of_a_tasks_head_rows(tiny):
    s = make_strategy("head_only", tiny, epochs=2, batch_size=4)
    assert not s.model.head.weight.any() and not s.model.head.bias.any()
    bm = stream()  # 2 tasks x 2 classes
    s.train(bm.train_stream[0])
    w, b = s.model.head.weight.detach(), s.model.head.bias.detach()
    assert w[0].abs().sum() > 0 and w[1].abs().sum() > 0  # the task's rows trained ...
    # ... in opposite directions: the masked-CE gradients of a task's rows sum to zero, so from a
    # zero init the pair's logits stay antisymmetric (no offset left for cross-task comparisons)
    assert torch.allclose(w[0] + w[1], torch.zeros_like(w[0]), atol=1e-6)
    assert torch.allclose(b[0] + b[1], torch.zeros(()), atol=1e-6)
    assert not w[2:].any() and not b[2:].any()  # rows of unseen classes untouched
    s.train(bm.train_stream[1])
    w = s.model.head.weight.detach()
    assert torch.allclose(w[2] + w[3], torch.zeros_like(w[2]), atol=1e-6)
