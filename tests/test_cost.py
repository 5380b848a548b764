"""protocols.cost on the tiny ViT: parameter and pass counts, and FLOPs that add up (the attention
matmuls included on CPU, the query pass counted)."""
import pytest
import torch

from methods import backbones, registry
from protocols.cost import check_passes, cost_row, count_flops, input_example
from helpers import hparams

torch.set_num_threads(1)
KEYS = {"method", "trainable_params", "head_params", "passes_train", "passes_test", "gflops_train",
        "gflops_test"}


def test_plain_forward_flops_match_the_hand_count(tiny):
    # 6 blocks, 50 tokens, D=64: qkv 3ND^2 + proj ND^2 + MLP 8ND^2 + attention 2N^2D MACs,
    # plus the 4x4 patch embedding; FLOPs = 2 MACs. The N^2 term proves SDPA is counted on CPU.
    n, d, depth = 50, 64, 6
    macs = depth * (12 * n * d * d + 2 * n * n * d) + 49 * 16 * d
    x = input_example(tiny)
    assert x.shape == (1, 1, 28, 28)
    assert count_flops(lambda: tiny(x)) == 2 * macs


@pytest.mark.parametrize("method", registry.names())
def test_cost_row_counts_and_pass_ratio(tiny, method):
    """Every registered method: its row's counts, and FLOPs per image that match the ViT passes
    it declares (the query pass counted)."""
    hp = hparams(method, "fmnist-5t")
    row = cost_row(method, tiny, 10, hp)
    assert set(row) == KEYS and row["method"] == method
    cls = registry.get(method)
    assert (row["passes_train"], row["passes_test"]) == (cls.passes_train, cls.passes_test)
    model = registry.create(method, vit=tiny, num_classes=10, hparams=hp).model
    assert row["trainable_params"] == sum(p.numel() for _, p in model.added_parameters())
    assert row["head_params"] == 64 * 10 + 10
    plain = count_flops(lambda: tiny(input_example(tiny))) / 1e9
    # forward GFLOPs per image ~ passes x one plain forward (prompt tokens add a little)
    for key, passes in (("gflops_test", row["passes_test"]), ("gflops_train", row["passes_train"])):
        assert passes * 0.99 <= row[key] / plain <= passes * 1.25, (key, row[key] / plain)


def test_expected_parameter_counts_on_tiny(tiny):
    rows = {m: cost_row(m, tiny, 10, hparams(m, "fmnist-5t"))["trainable_params"]
            for m in ("l2p", "dualprompt", "coda_prompt")}
    d = 64
    assert rows["l2p"] == 10 * 2 * d + 10 * d  # pool 10 x length 2, + 10 keys
    assert rows["dualprompt"] == 2 * 2 * 5 * d + 3 * 2 * 5 * 5 * d + 5 * d  # G + E pool 5 + keys
    assert rows["coda_prompt"] == 5 * 20 * (8 * d + d + d)  # 5 layers x 20 components (P, K, A)


def test_default_cost_forward_sets_up_an_untrained_strategy(tiny):
    s = registry.create("head_only", vit=tiny, num_classes=10)
    out = s.cost_forward(input_example(tiny), training=True)
    assert out.shape == (1, 10) and s.model.training and s.task_id == 0
    s.cost_forward(input_example(tiny), training=False)
    assert not s.model.training


def test_attention_backward_flops_are_counted_on_cpu():
    # the CPU SDPA kernels (forward and backward) are unknown to FlopCounterMode; without the
    # mapping a training step's attention FLOPs would silently be zero
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    shape = (2, 4, 50, 16)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    fwd = count_flops(lambda: sdpa(q, k, v))
    step = count_flops(lambda: sdpa(q, k, v).sum().backward())
    assert fwd == sdpa_flop_count(shape, shape, shape) > 0
    assert step == fwd + sdpa_backward_flop_count(shape, shape, shape, shape)


@pytest.mark.parametrize("method", registry.names())
def test_every_method_declares_the_passes_its_forward_runs(method, tiny):
    """passes_train / passes_test are typed by hand; this counts the ViT passes of the forward."""
    cls = registry.get(method)
    assert check_passes(method, tiny, 10, hparams(method, "fmnist-5t")) == \
        (cls.passes_train, cls.passes_test)


def test_a_wrong_pass_declaration_is_caught(tiny, monkeypatch):
    monkeypatch.setattr(registry.get("l2p"), "passes_test", 1)  # it runs the query pass too
    with pytest.raises(ValueError, match="declares passes_train=2, passes_test=1 .* runs the ViT 2 / 2"):
        check_passes("l2p", tiny, 10, hparams("l2p", "fmnist-5t"))
