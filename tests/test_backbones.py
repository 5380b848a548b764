"""Backbone registry: strict checkpoint loading, conversion, clear errors, the shipped tiny ViT."""
import dataclasses
import json
import socket

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from methods import backbones
from methods.backbones import BackboneError
from methods.vit import PromptedViT


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


# ------------------------------------------------------------------ Google's .npz (sup21k_npz)

#: a small ViT in the ViT-B/16 layout (3 channels, class token, qkv bias), for speed
SMALL = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0,
             qkv_bias=True, num_classes=0)


def write_google_npz(vit, path, extra_heads=True):
    """`vit`'s weights in the key layout of Google's JAX checkpoints (google-research/
    vision_transformer, e.g. imagenet21k/ViT-B_16.npz): HWIO patch kernel, per-head query / key /
    value / out kernels, LayerNorm_0 / LayerNorm_2, MlpBlock_3, plus the head and pre-logits layers
    the suite drops. Written by hand from the layout, independently of timm's reader."""
    import numpy as np

    sd = {k: v.detach().numpy() for k, v in vit.state_dict().items()}
    d, h = vit.embed_dim, vit.blocks[0].attn.num_heads
    hd = d // h
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"]}
    for i in range(len(vit.blocks)):
        b, t = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, n in enumerate(("query", "key", "value")):
            w[t + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, h, hd)
            w[t + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, hd)
        w[t + "MultiHeadDotProductAttention_1/out/kernel"] = sd[b + "attn.proj.weight"].reshape(d, h, hd).transpose(1, 2, 0)
        w[t + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for ln, ours in (("LayerNorm_0", "norm1"), ("LayerNorm_2", "norm2")):
            w[t + f"{ln}/scale"], w[t + f"{ln}/bias"] = sd[b + ours + ".weight"], sd[b + ours + ".bias"]
        for k, fc in ((0, "fc1"), (1, "fc2")):
            w[t + f"MlpBlock_3/Dense_{k}/kernel"] = sd[b + f"mlp.{fc}.weight"].T
            w[t + f"MlpBlock_3/Dense_{k}/bias"] = sd[b + f"mlp.{fc}.bias"]
    if extra_heads:  # ImageNet-21k checkpoints carry a 21,843-way head and a pre-logits layer
        w.update({"head/kernel": np.ones((d, 7), np.float32), "head/bias": np.ones(7, np.float32),
                  "pre_logits/kernel": np.ones((d, d), np.float32), "pre_logits/bias": np.ones(d, np.float32)})
    np.savez(path, **w)
    return w


@pytest.fixture()
def npz_backbone(monkeypatch):
    """`sup21k_npz` with the small architecture (everything else as shipped)."""
    spec = backbones.get_spec("sup21k_npz")
    monkeypatch.setitem(backbones.BACKBONES, "sup21k_npz", dataclasses.replace(spec, arch=SMALL, image_size=32))
    backbones._weights.cache_clear()  # weights read with the shipped architecture must not be reused
    yield spec
    backbones._weights.cache_clear()


def test_the_npz_backbone_is_vit_b16_from_google_s_file():
    spec = backbones.get_spec("sup21k_npz")
    assert spec.files == ("ViT-B_16.npz",) and spec.arch == backbones.VIT_B16
    assert "L2P, DualPrompt and HiDe-Prompt" in spec.description


def test_a_google_npz_loads_strictly_and_gives_the_features_of_the_same_timm_weights(tmp_path, npz_backbone):
    torch.manual_seed(0)
    reference = VisionTransformer(**SMALL).eval()
    write_google_npz(reference, tmp_path / "ViT-B_16.npz")
    bb = backbones.load("sup21k_npz", str(tmp_path))
    assert bb.source == str(tmp_path / "ViT-B_16.npz") and bb.sha256 == backbones.sha256_file(tmp_path / "ViT-B_16.npz")
    for k, v in reference.state_dict().items():  # every tensor, exactly (the head layers are dropped)
        assert torch.equal(bb.vit.vit.state_dict()[k], v), k
    timm_loaded = VisionTransformer(**SMALL)
    backbones.load_strict(timm_loaded, reference.state_dict(), "state dict")
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(bb.vit(x), PromptedViT(timm_loaded)(x), atol=1e-6)
        assert torch.allclose(bb.vit.forward_features(x), timm_loaded.forward_features(x), atol=1e-6)


def test_an_incomplete_or_foreign_npz_is_refused_naming_the_keys(tmp_path, npz_backbone):
    import numpy as np

    w = write_google_npz(VisionTransformer(**SMALL), tmp_path / "full.npz", extra_heads=False)
    w.pop("Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias")
    w["Transformer/encoderblock_1/Extra/kernel"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "ViT-B_16.npz", **w)
    with pytest.raises(BackboneError, match=r"missing keys \[Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias\]"
                                            r".*unexpected keys \[Transformer/encoderblock_1/Extra/kernel\]"):
        backbones.load("sup21k_npz", str(tmp_path))
    # a checkpoint of another size: the architecture check names the shapes
    other = VisionTransformer(**dict(SMALL, embed_dim=32))
    write_google_npz(other, tmp_path / "ViT-B_16.npz")
    with pytest.raises(BackboneError, match="shape mismatches"):
        backbones.load("sup21k_npz", str(tmp_path))
    (tmp_path / "ViT-B_16.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(BackboneError, match="cannot be read"):
        backbones.load("sup21k_npz", str(tmp_path))


# ------------------------------------------------------------------ hints and the hub


def test_the_weights_hint_names_each_path_looked_for_once_and_the_fetch_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackboneError) as e:
        backbones.load("sup21k", "pretrained")
    msg = str(e.value)
    looked = msg.split("looked for ", 1)[1].split(";", 1)[0].split(", ")
    assert looked == [f"pretrained/{f}" for f in backbones.get_spec("sup21k").files]
    assert "run_suite.py fetch --backbones sup21k --weights-dir pretrained" in msg
    assert "downloads it as pretrained/vit_base_patch16_224.augreg_in21k.safetensors" in msg
    # the file names the hint tells a user to save are names the suite looks for
    assert "saved as vit_base_patch16_224_augreg_in21k.bin" in msg and "vit_base_patch16_224_augreg_in21k.bin" in looked[1]


def test_allow_download_without_a_reachable_hub_is_a_fast_user_error(monkeypatch, tmp_path):
    def unreachable(*a, **k):
        raise socket.gaierror(-2, "Name or service not known")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(backbones.timm, "create_model", lambda *a, **k: pytest.fail("timm asked the hub"))
    with pytest.raises(BackboneError, match=r"cannot reach the timm hub at .*Name or service not known.*"
                                            r"run_suite.py fetch --backbones sup1k"):
        backbones.load("sup1k", str(tmp_path), allow_download=True)


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
