"""Named frozen backbones: architecture, weights file, checkpoint conversion, preprocessing.

Like timm's pretrained configs, each name carries everything needed to build it and to feed it.
Weights are read from files (never fetched at test time): `<weights_dir>/<file>` for the ViT-B/16
backbones (default `pretrained/`), and the shipped `methods/weights/tiny_fmnist.pt` for `tiny`.
`allow_download=True` lets the two supervised backbones come from the timm hub instead.

Loading is safe and strict: a checkpoint is read only with `torch.load(weights_only=True)` or as
safetensors, so a file can never run code; one that cannot be read that way (refused, truncated, not
a checkpoint) and one whose keys do not match the architecture raise `BackboneError` naming the file
and what to do (the missing and unexpected keys for a mismatch), instead of loading half-empty as
some reference code does. Classifier heads of the source checkpoints (`head.*`) are dropped on purpose: every method
trains its own head.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import torch
import timm
from timm.models.vision_transformer import VisionTransformer

from .vit import PromptedViT

SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneError(RuntimeError):
    """A backbone cannot be built: unknown name, missing, unreadable or mismatching checkpoint."""


def _drop_heads(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}


def _ssl_keys(sd: dict) -> dict:
    """iBOT / DINO checkpoints: unwrap `state_dict`/`teacher`, strip DDP / wrapper prefixes, drop
    the projection heads and iBOT's mask token, none of which the frozen encoder uses."""
    for key in ("state_dict", "teacher", "model"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "backbone.", "encoder."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith(("head.", "masked_embed")):
            continue
        out[k] = v
    return out


def _plain(sd: dict) -> dict:
    for key in ("state_dict", "model"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return _drop_heads(sd)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    description: str
    arch: dict
    files: tuple[str, ...]
    image_size: int
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    convert: Callable[[dict], dict] = _plain
    timm_name: str | None = None  # hub tag, for allow_download
    shipped: bool = False  # the file lives in methods/weights/
    download_hint: str = ""


VIT_B16 = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12,
               mlp_ratio=4.0, qkv_bias=True, num_classes=0)
# The tiny ViT of the embedded default: 28 px, 4x4 patches (49 tokens + [CLS]), 6 blocks, 4 heads
# of 16 dims. Six blocks so that layer sets 0-4 (CODA, HiDe, VQ) and 0-2 (SMoPE's first half) both
# exist; small enough for several hundred images/s on two CPU cores.
VIT_TINY = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=6, num_heads=4,
                mlp_ratio=4.0, qkv_bias=True, num_classes=0)

BACKBONES: dict[str, BackboneSpec] = {
    "sup21k": BackboneSpec(
        "sup21k", "ViT-B/16 supervised ImageNet-21k (timm augreg_in21k)", VIT_B16,
        ("vit_base_patch16_224_augreg_in21k.bin", "vit_base_patch16_224.augreg_in21k.safetensors",
         "vit_base_patch16_224_augreg_in21k.pth"),
        224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        timm_name="vit_base_patch16_224.augreg_in21k",
        download_hint="huggingface.co/timm/vit_base_patch16_224.augreg_in21k (pytorch_model.bin)"),
    "sup1k": BackboneSpec(
        "sup1k", "ViT-B/16 ImageNet-21k then fine-tuned ImageNet-1k (timm augreg2_in21k_ft_in1k)",
        VIT_B16,
        ("vit_base_patch16_224_augreg2_in21k_ft_in1k.bin",
         "vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors",
         "vit_base_patch16_224_augreg2_in21k_ft_in1k.pth"),
        224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        timm_name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
        download_hint="huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "ibot1k": BackboneSpec(
        "ibot1k", "ViT-B/16 iBOT teacher, self-supervised ImageNet-1k", VIT_B16,
        ("ibot_vit_base16.pth", "checkpoint_teacher.pth"), 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        convert=_ssl_keys,
        download_hint="the iBOT ViT-B/16 teacher checkpoint from github.com/bytedance/ibot"),
    "dino1k": BackboneSpec(
        "dino1k", "ViT-B/16 DINO, self-supervised ImageNet-1k", VIT_B16,
        ("dino_vitbase16_pretrain.pth",), 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        convert=_ssl_keys,
        download_hint="dino_vitbase16_pretrain.pth from github.com/facebookresearch/dino"),
    "tiny": BackboneSpec(
        "tiny", "ViT-tiny (28 px, 6x64), pretrained by `python -m protocols.pretrain_tiny` on "
        "Fashion-MNIST training images the default stream never uses", VIT_TINY,
        ("tiny_fmnist.pt",), 28, 1, (0.0,), (1.0,), shipped=True,
        download_hint="it ships in the repo; rebuild with `python -m protocols.pretrain_tiny`"),
}


@dataclass
class Backbone:
    """A loaded frozen backbone: the prompted ViT, its spec, and the checkpoint's sha256."""
    name: str
    vit: PromptedViT
    spec: BackboneSpec
    sha256: str
    source: str = ""
    extra: dict = field(default_factory=dict)


def names() -> list[str]:
    return list(BACKBONES)


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)}") from None


def build_architecture(name: str) -> VisionTransformer:
    """The backbone's ViT with random weights (no file read)."""
    return VisionTransformer(**get_spec(name).arch)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _unreadable(path: Path, detail: str, again: str) -> BackboneError:
    return BackboneError(f"checkpoint {path}: cannot be read ({detail}); the file is truncated or not "
                         f"a PyTorch / safetensors checkpoint: {again}")


def _read_checkpoint(path: Path, how_to_get: str = "") -> dict:
    """The checkpoint's dict, read safely (`weights_only=True` or safetensors); any file that cannot
    be read so is one `BackboneError` naming it."""
    again = f"download it again ({how_to_get})" if how_to_get else "download it again"
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only names the global it refused ("GLOBAL posix.system"); garbage is an "operand"
        if "GLOBAL " in str(e):
            raise BackboneError(
                f"checkpoint {path}: refused: it holds Python objects besides tensors and plain "
                "containers, and the suite loads checkpoints only with torch.load(weights_only=True) "
                "(unpickling anything else could run code). If you trust the file, re-save just its "
                "tensors (torch.save(state_dict, ...) or safetensors) and point --weights-dir at that; "
                f"otherwise {again}") from None
        raise _unreadable(path, "UnpicklingError: not a pickle torch can read", again) from None
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes torch / safetensors raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise _unreadable(path, type(e).__name__ + (f": {first}" if first else ""), again) from None
    if not isinstance(sd, dict):
        raise BackboneError(f"checkpoint {path}: holds a {type(sd).__name__}, not a state dict; {again}")
    return sd


def load_strict(vit: VisionTransformer, sd: dict, source: str) -> None:
    """Load `sd` into `vit`, failing loudly on any missing or unexpected key or shape."""
    own = vit.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... (+{len(keys) - 8})" if len(keys) > 8 else "")
        raise BackboneError(
            f"checkpoint {source} does not match the architecture: "
            f"missing keys [{show(missing)}]; unexpected keys [{show(unexpected)}]; "
            f"shape mismatches [{show(wrong)}]")
    vit.load_state_dict(sd, strict=True)


def find_weights(name: str, weights_dir: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    spec = get_spec(name)
    roots = [Path(weights_dir)] if weights_dir else []
    roots.append(Path("pretrained"))
    if spec.shipped:
        roots.insert(0, SHIPPED_WEIGHTS)
    tried = [root / f for root in roots for f in spec.files]
    return next((p for p in tried if p.is_file()), None), tried


@lru_cache(maxsize=4)
def load(name: str, weights_dir: str | None = None, random_init: bool = False,
         allow_download: bool = False) -> Backbone:
    """Build backbone `name`, frozen, with its weights (cached per process: it is never mutated).

    `random_init=True` skips the weights (cost measurement, tests): sha256 is "random-init".
    """
    spec = get_spec(name)
    if random_init:
        torch.manual_seed(0)
        vit = build_architecture(name)
        return Backbone(name, PromptedViT(vit), spec, "random-init", "random-init")
    path, tried = find_weights(name, weights_dir)
    if path is not None:
        vit = build_architecture(name)
        sd = spec.convert(_read_checkpoint(path, spec.download_hint))
        odd = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
        if odd:
            raise BackboneError(f"checkpoint {path}: entries {odd[:5]} are not tensors; it is not a "
                                f"{spec.description} checkpoint: {spec.download_hint}")
        load_strict(vit, sd, str(path))
        return Backbone(name, PromptedViT(vit), spec, sha256_file(path), str(path))
    if allow_download and spec.timm_name:
        hub = timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
        vit = build_architecture(name)
        load_strict(vit, _drop_heads(hub.state_dict()), f"timm hub {spec.timm_name}")
        digest = hashlib.sha256()
        for k, v in sorted(vit.state_dict().items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        return Backbone(name, PromptedViT(vit), spec, "tensors:" + digest.hexdigest(),
                        f"timm hub {spec.timm_name}")
    how = f"download {spec.download_hint} into {Path(weights_dir or 'pretrained')}/"
    if spec.timm_name:
        how += " or pass --allow-download to fetch it from the timm hub"
    raise BackboneError(
        f"no weights for backbone {name!r}: looked in {', '.join(str(p) for p in tried)}; {how}")
