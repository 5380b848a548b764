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
        backbones.load.__wrapped__("dino1k", str(tmp_path))
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
