"""Backbone registry: strict checkpoint loading, conversion, clear errors, the shipped tiny ViT."""
import json

import pytest
import torch

from methods import backbones
from methods.backbones import BackboneError


def test_unknown_backbone_names_the_valid_ones():
    with pytest.raises(BackboneError, match="sup21k"):
        backbones.get_spec("vit_huge")


def test_missing_file_lists_paths_and_how_to_get(tmp_path):
    with pytest.raises(BackboneError) as e:
        backbones.load("dino1k", str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "dino_vitbase16_pretrain.pth") in msg and "facebookresearch/dino" in msg


def test_mismatching_checkpoint_fails_loudly():
    vit = backbones.build_architecture("tiny")
    sd = vit.state_dict()
    sd.pop("blocks.0.attn.qkv.weight")
    sd["blocks.9.extra"] = torch.zeros(1)
    with pytest.raises(BackboneError, match=r"missing keys \[blocks.0.attn.qkv.weight\].*unexpected keys \[blocks.9.extra\]"):
        backbones.load_strict(vit, sd, "x.pth")
    sd = vit.state_dict()
    sd["pos_embed"] = torch.zeros(1, 3, 64)
    with pytest.raises(BackboneError, match="shape mismatches"):
        backbones.load_strict(vit, sd, "x.pth")


def test_ssl_checkpoint_conversion(tmp_path):
    """iBOT/DINO files: `state_dict` wrapper, DDP / backbone prefixes and projection heads go."""
    vit = backbones.build_architecture("tiny")
    wrapped = {"state_dict": {f"module.backbone.{k}": v for k, v in vit.state_dict().items()}}
    wrapped["state_dict"]["module.head.mlp.0.weight"] = torch.zeros(3, 3)
    wrapped["state_dict"]["module.backbone.masked_embed"] = torch.zeros(64)
    fresh = backbones.build_architecture("tiny")
    backbones.load_strict(fresh, backbones._ssl_keys(wrapped), "ibot.pth")
    for k, v in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_supervised_checkpoint_drops_the_source_head():
    vit = backbones.build_architecture("tiny")
    sd = dict(vit.state_dict(), **{"head.weight": torch.zeros(21843, 64), "head.bias": torch.zeros(21843)})
    fresh = backbones.build_architecture("tiny")
    backbones.load_strict(fresh, backbones._plain(sd), "in21k.bin")


def test_shipped_tiny_checkpoint_matches_its_record():
    path = backbones.SHIPPED_WEIGHTS / "tiny_fmnist.pt"
    meta = json.loads(path.with_suffix(".json").read_text())
    assert backbones.sha256_file(path) == meta["sha256"]
    bb = backbones.load("tiny")
    assert bb.sha256 == meta["sha256"]
    assert bb.vit.embed_dim == 64 and bb.vit.depth == 6 and bb.vit.num_heads == 4
    assert not any(p.requires_grad for p in bb.vit.parameters())


def test_random_init_backbone_is_marked():
    bb = backbones.load("tiny", random_init=True)
    assert bb.sha256 == "random-init"


@pytest.mark.parametrize("random_init", [False, True])
def test_each_load_is_a_fresh_module_with_the_same_weights(random_init):
    """No shared state: a caller may move, freeze or even overwrite its backbone without touching
    the next caller's."""
    a = backbones.load("tiny", random_init=random_init)
    b = backbones.load("tiny", random_init=random_init)
    assert a.vit is not b.vit and a.sha256 == b.sha256
    sa, sb = a.vit.state_dict(), b.vit.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].data_ptr() != sb[k].data_ptr() for k in sa)
    assert not any(p.requires_grad for p in b.vit.parameters())
    with torch.no_grad():
        for p in a.vit.parameters():
            p.zero_()
    c = backbones.load("tiny", random_init=random_init)
    assert all(torch.equal(sb[k], v) for k, v in c.vit.state_dict().items())


def test_loading_leaves_the_global_rng_alone():
    """Random init draws from its own generator, seeded by the backbone's name: loading (first or
    again) neither reads nor reseeds the caller's random stream."""
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    backbones._weights.cache_clear()  # a first load too, not only a cached one
    state = torch.random.get_rng_state()
    for name, random_init in (("tiny", True), ("tiny", True), ("tiny", False)):
        backbones.load(name, random_init=random_init)
        assert torch.equal(torch.random.get_rng_state(), state), (name, random_init)
    assert torch.equal(torch.rand(5), expected)


def test_random_init_is_deterministic_per_name_and_timm_distributed():
    a = backbones.random_weights("tiny")
    assert all(torch.equal(a[k], v) for k, v in backbones.random_weights("tiny").items())
    assert a["blocks.0.norm1.weight"].eq(1).all() and a["blocks.0.attn.qkv.bias"].eq(0).all()
    qkv = a["blocks.0.attn.qkv.weight"]
    assert abs(qkv.std().item() - 0.02) < 2e-3 and qkv.abs().max() <= 2.0  # trunc_normal(.02)
    assert a["cls_token"].abs().max() < 1e-4 and abs(a["pos_embed"].std().item() - 0.02) < 3e-3


def test_a_run_does_not_depend_on_the_loads_before_it(tmp_path):
    """The same run gives the same record whether or not other backbones were loaded (and
    changed) earlier in the process, and whatever the global RNG held before."""
    from benchmarks.synthetic import write_fashion_mnist
    from protocols.runner import RunOptions, RunSpec, run

    write_fashion_mnist(tmp_path / "fashion-mnist", train_per_class=4, test_per_class=2)
    proto = tmp_path / "p.yaml"
    proto.write_text("name: p\ndataset: fashion_mnist\nnum_tasks: 2\n"
                     "methods:\n  l2p: {epochs: 1, batch_size: 8, prompt_length: 2}\n")
    options = RunOptions(data_root=str(tmp_path), weights_dir=None, random_init=True, quiet=True)
    spec = RunSpec(str(proto), "tiny", "l2p", 0)
    backbones._weights.cache_clear()
    first = run(spec, options)
    other = backbones.load("tiny", random_init=True)  # a caller that mutates its copy
    with torch.no_grad():
        for p in other.vit.parameters():
            p.mul_(-1.0)
    torch.manual_seed(999)
    torch.rand(17)
    again = run(spec, options)
    assert again["acc_matrix"] == first["acc_matrix"] and again["key"] == first["key"]
