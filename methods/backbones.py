"""Named frozen backbones: architecture, weights file, checkpoint conversion, preprocessing.

Like timm's pretrained configs, each name carries everything needed to build it and to feed it.
Weights are read from files (never fetched at test time): `<weights_dir>/<file>` for the ViT-B/16
backbones (default `pretrained/`; `run_suite.py fetch` downloads them under exactly those names), and
the shipped `methods/weights/tiny_fmnist.pt` for `tiny`. `allow_download=True` lets the two
supervised backbones come from the timm hub instead (a hub that cannot be reached is a
`BackboneError` within seconds, not a minute of retries).

Loading is safe and strict: a checkpoint is read only with `torch.load(weights_only=True)`, as
safetensors, or (Google's JAX `.npz`, `sup21k_npz`) with `numpy.load(allow_pickle=False)` through
timm's own npz loader, so a file can never run code; one that cannot be read that way (refused, truncated, not
a checkpoint) and one whose keys do not match the architecture raise `BackboneError` naming the file
and what to do (the missing and unexpected keys for a mismatch), instead of loading half-empty as
some reference code does. Classifier heads of the source checkpoints (`head.*`) are dropped on purpose: every method
trains its own head.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import socket
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import timm
from huggingface_hub import constants as hub_constants
from timm.layers import resample_abs_pos_embed
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
        ("vit_base_patch16_224.augreg_in21k.safetensors", "vit_base_patch16_224_augreg_in21k.bin",
         "vit_base_patch16_224_augreg_in21k.pth"),
        224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        timm_name="vit_base_patch16_224.augreg_in21k",
        download_hint="model.safetensors (or pytorch_model.bin, saved as vit_base_patch16_224_augreg_in21k.bin) "
                      "from huggingface.co/timm/vit_base_patch16_224.augreg_in21k"),
    "sup1k": BackboneSpec(
        "sup1k", "ViT-B/16 ImageNet-21k then fine-tuned ImageNet-1k (timm augreg2_in21k_ft_in1k)",
        VIT_B16,
        ("vit_base_patch16_224.augreg2_in21k_ft_in1k.safetensors",
         "vit_base_patch16_224_augreg2_in21k_ft_in1k.bin",
         "vit_base_patch16_224_augreg2_in21k_ft_in1k.pth"),
        224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        timm_name="vit_base_patch16_224.augreg2_in21k_ft_in1k",
        download_hint="model.safetensors (or pytorch_model.bin, saved as "
                      "vit_base_patch16_224_augreg2_in21k_ft_in1k.bin) from "
                      "huggingface.co/timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"),
    "sup21k_npz": BackboneSpec(
        "sup21k_npz", "ViT-B/16 supervised ImageNet-21k, Google's original ViT-B_16.npz (the "
        "checkpoint of the L2P, DualPrompt and HiDe-Prompt papers)", VIT_B16,
        ("ViT-B_16.npz",), 224, 3, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        download_hint="ViT-B_16.npz from storage.googleapis.com/vit_models/imagenet21k/ (if that no "
                      "longer serves it, a copy from a colleague: fetch --mirror FOLDER checks it)"),
    "ibot1k": BackboneSpec(
        "ibot1k", "ViT-B/16 iBOT teacher, self-supervised ImageNet-1k", VIT_B16,
        ("ibot_vit_base16.pth", "checkpoint_teacher.pth"), 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        convert=_ssl_keys,
        download_hint="checkpoint_teacher.pth of the iBOT ViT-B/16 (github.com/bytedance/ibot), saved "
                      "as ibot_vit_base16.pth"),
    "dino1k": BackboneSpec(
        "dino1k", "ViT-B/16 DINO, self-supervised ImageNet-1k", VIT_B16,
        ("dino_vitbase16_pretrain.pth",), 224, 3, IMAGENET_MEAN, IMAGENET_STD,
        convert=_ssl_keys,
        download_hint="dino_vitbase16_pretrain.pth (github.com/facebookresearch/dino)"),
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
    """The spec of backbone `name`, or of `name@<px>`: that backbone fed `px`-pixel inputs (a
    multiple of its patch size), as timm builds a ViT at another `img_size`: the same weights with
    the position embedding resampled to the new patch grid. Cheap real-architecture dry runs use
    it (`sup21k@32`: ViT-B/16 on CIFAR's own 32 px, 2 x 2 patches)."""
    base, at, size = name.partition("@")
    try:
        spec = BACKBONES[base]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)} "
                            "(or NAME@PIXELS for another input size)") from None
    if not at:
        return spec
    patch = spec.arch["patch_size"]
    if not size.isdigit() or int(size) < patch or int(size) % patch:
        raise BackboneError(f"backbone {name!r}: the input size after '@' must be a multiple of "
                            f"{base}'s patch size {patch}, e.g. {base}@{2 * patch}")
    px = int(size)
    return dataclasses.replace(spec, name=name, arch={**spec.arch, "img_size": px}, image_size=px,
                               description=f"{spec.description}, fed {px} px inputs")


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
    if path.suffix == ".npz":
        return read_npz(path, again)
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


def check_keys(vit: VisionTransformer, sd: dict, source: str) -> None:
    """Fail loudly unless `sd` has exactly `vit`'s keys and shapes (`vit` may be on `meta`)."""
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


def load_strict(vit: VisionTransformer, sd: dict, source: str) -> None:
    """Load `sd` into `vit`, failing loudly on any missing or unexpected key or shape."""
    check_keys(vit, sd, source)
    vit.load_state_dict(sd, strict=True)


def find_weights(name: str, weights_dir: str | os.PathLike | None) -> tuple[Path | None, list[Path]]:
    """The first existing weights file of backbone `name`, and every path looked at, each once:
    `<weights_dir>/<file>`, then `pretrained/<file>` (the shipped folder first for `tiny`)."""
    spec = get_spec(name)
    roots = [Path(weights_dir)] if weights_dir else []
    roots.append(Path("pretrained"))
    if spec.shipped:
        roots.insert(0, SHIPPED_WEIGHTS)
    tried = list(dict.fromkeys(root / f for root in dict.fromkeys(roots) for f in spec.files))
    return next((p for p in tried if p.is_file()), None), tried


#: the JAX names of one encoder block of Google's ViT checkpoints (google-research/vision_transformer)
_NPZ_BLOCK = [f"LayerNorm_{i}/{p}" for i in (0, 2) for p in ("scale", "bias")] + [
    f"MultiHeadDotProductAttention_1/{n}/{p}" for n in ("query", "key", "value", "out") for p in ("kernel", "bias")] + [
    f"MlpBlock_3/Dense_{i}/{p}" for i in (0, 1) for p in ("kernel", "bias")]
#: what the suite drops on purpose: the classifier and the pre-logits layer (its head input is the
#: final-LN [CLS], as in google-research/vision_transformer's `load_pretrained` drop-head variant)
_NPZ_HEADS = ("head/", "pre_logits/")


def read_npz(path: str | os.PathLike, again: str = "download it again") -> dict:
    """A timm state dict from a Google JAX ViT checkpoint (`ViT-B_16.npz`), read strictly.

    The architecture is read off the file's own shapes, every JAX key it must hold is checked
    (missing and unexpected keys are listed; `head/*` and `pre_logits/*` are dropped), then timm's
    npz loader (`VisionTransformer.load_pretrained`) converts it, into a model first filled with NaN
    so that a parameter it skipped cannot pass unnoticed. `load_strict` then matches the result
    against the backbone's architecture. Nothing is unpickled (`allow_pickle=False`)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as w:
            shapes = {k: tuple(w[k].shape) for k in w.files}
    except Exception as e:  # noqa: BLE001 - whatever numpy raises on a damaged or foreign file
        raise _unreadable(path, f"{type(e).__name__}: not a numpy .npz archive", again) from None
    try:
        patch, _, chans, dim = shapes["embedding/kernel"]
        heads = shapes["Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel"][1]
        hidden = shapes["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"][1]
        positions = shapes["Transformer/posembed_input/pos_embedding"][1]
    except (KeyError, ValueError, IndexError):
        raise BackboneError(f"checkpoint {path}: not a Google ViT .npz checkpoint (no embedding/kernel, "
                            f"encoderblock_0 or posembed_input entry of the right rank); {again}") from None
    depth = sum(1 for k in shapes if k.startswith("Transformer/encoderblock_") and k.endswith("/LayerNorm_0/scale"))
    grid = int(round((positions - 1) ** 0.5))
    expected = {"embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
                "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias"}
    expected |= {f"Transformer/encoderblock_{i}/{k}" for i in range(depth) for k in _NPZ_BLOCK}
    missing = sorted(expected - set(shapes))
    unexpected = sorted(k for k in set(shapes) - expected if not k.startswith(_NPZ_HEADS))
    if missing or unexpected or grid * grid != positions - 1:
        raise BackboneError(f"checkpoint {path} is not a complete Google ViT checkpoint: missing keys "
                            f"[{', '.join(missing[:8])}]; unexpected keys [{', '.join(unexpected[:8])}]; "
                            f"{positions} position embeddings; {again}")
    vit = VisionTransformer(img_size=grid * patch, patch_size=patch, in_chans=chans, embed_dim=dim,
                            depth=depth, num_heads=heads, mlp_ratio=hidden / dim, qkv_bias=True,
                            num_classes=0)
    with torch.no_grad():
        for p in vit.parameters():
            p.fill_(float("nan"))
    try:
        vit.load_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - a shape that timm cannot place
        raise BackboneError(f"checkpoint {path}: timm's npz loader refused it ({type(e).__name__}: "
                            f"{str(e)[:200]}); {again}") from None
    skipped = [k for k, v in vit.state_dict().items() if torch.isnan(v).any()]
    if skipped:
        raise BackboneError(f"checkpoint {path}: timm's npz loader left {', '.join(skipped[:8])} unset; "
                            f"it is not a ViT checkpoint this suite can use; {again}")
    return vit.state_dict()


def read_weights(name: str, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of checkpoint `path`, converted for backbone `name` and checked against its
    architecture (every key and shape); any problem is one `BackboneError` naming the file. What
    `load` reads and what `fetch` asks of a checkpoint whose publisher states no checksum."""
    spec = get_spec(name)
    sd = spec.convert(_read_checkpoint(Path(path), spec.download_hint))
    odd = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if odd:
        raise BackboneError(f"checkpoint {path}: entries {odd[:5]} are not tensors; it is not a "
                            f"{spec.description} checkpoint: {spec.download_hint}")
    sd = _fit_input_size(name, sd)
    check_keys(skeleton(name), sd, str(path))
    return sd


def verify_checkpoint(name: str, path: str | os.PathLike) -> None:
    """Raise `BackboneError` unless `path` loads strictly into backbone `name`."""
    read_weights(name, path)


def _hub_model(spec: BackboneSpec) -> VisionTransformer:
    """timm's hub model for `spec`, or, within seconds, one `BackboneError` saying why not (timm
    retries an unreachable hub for about a minute, then raises an error that is no user error)."""
    host = urllib.parse.urlparse(hub_constants.ENDPOINT).hostname or "huggingface.co"
    fetch = (f"fetch the file on a machine with a network (`python run_suite.py fetch --backbones "
             f"{spec.name} --weights-dir DIR`) and pass --weights-dir DIR")
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as e:
        raise BackboneError(f"--allow-download: cannot reach the timm hub at {host} ({e.strerror or e}); "
                            f"{fetch}") from None
    try:
        return timm.create_model(spec.timm_name, pretrained=True, num_classes=0)
    except Exception as e:  # noqa: BLE001 - the hub's and timm's many failures are all "no weights"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BackboneError(f"--allow-download: timm could not get {spec.timm_name} from the hub "
                            f"({type(e).__name__}: {first}); {fetch}") from None


def load(name: str, weights_dir: str | os.PathLike | None = None, random_init: bool = False,
         allow_download: bool = False) -> Backbone:
    """Build backbone `name`, frozen, with its weights: a fresh module at every call, so a caller
    may move, freeze or hook it without touching anyone else's copy. The weights are read (or
    drawn) once per process and copied into each new module.

    `random_init=True` skips the checkpoint (cost measurement, tests, smoke runs): the weights
    follow timm's ViT initialisation, drawn from a generator seeded by the backbone's name, so they
    are the same in every process and loading never touches the global RNG; sha256 is
    "random-init".
    """
    spec = get_spec(name)
    sd, sha256, source = _weights(name, None if weights_dir is None else str(weights_dir),
                                  bool(random_init), bool(allow_download))
    vit = skeleton(name).to_empty(device="cpu")
    vit.load_state_dict(sd, strict=True)
    return Backbone(name, PromptedViT(vit), spec, sha256, source)


def skeleton(name: str) -> VisionTransformer:
    """The backbone's architecture on the `meta` device: every shape, no memory, no weights, no
    random draw (what counting parameters or building a module to load into needs)."""
    with torch.device("meta"):
        return VisionTransformer(**get_spec(name).arch, weight_init="skip")


@lru_cache(maxsize=4)
def _weights(name: str, weights_dir: str | None, random_init: bool,
             allow_download: bool) -> tuple[dict[str, torch.Tensor], str, str]:
    """(state dict matching `skeleton(name)`, checkpoint sha256, source) of `load`; cached, and
    never handed out: `load` copies it into a new module."""
    spec = get_spec(name)
    if random_init:
        return random_weights(name), "random-init", "random-init"
    path, tried = find_weights(name, weights_dir)
    if path is not None:
        sd = read_weights(name, path)
        return sd, sha256_file(path), str(path)
    if allow_download and spec.timm_name:
        hub = _hub_model(spec)
        source = f"timm hub {spec.timm_name}"
        sd = _fit_input_size(name, _drop_heads(hub.state_dict()))
        check_keys(skeleton(name), sd, source)
        digest = hashlib.sha256()
        for k, v in sorted(sd.items()):
            digest.update(k.encode())
            digest.update(v.detach().cpu().contiguous().numpy().tobytes())
        return sd, "tensors:" + digest.hexdigest(), source
    folder = Path(weights_dir or "pretrained")
    how = (f"`python run_suite.py fetch --backbones {name} --weights-dir {folder}` downloads it as "
           f"{folder / spec.files[0]}; or save {spec.download_hint} under one of those names")
    if spec.timm_name:
        how += "; or pass --allow-download to fetch it from the timm hub"
    raise BackboneError(
        f"no weights for backbone {name!r}: looked for {', '.join(str(p) for p in tried)}; {how}")


def _fit_input_size(name: str, sd: dict) -> dict:
    """For `name@<px>`: the checkpoint's position embedding resampled (bicubic, timm's
    `resample_abs_pos_embed`) to the patch grid of that input size; other names: `sd` as is."""
    if "@" not in name or "pos_embed" not in sd:
        return sd
    vit = skeleton(name)
    if tuple(sd["pos_embed"].shape) == tuple(vit.pos_embed.shape):
        return sd
    pos = resample_abs_pos_embed(sd["pos_embed"], new_size=list(vit.patch_embed.grid_size),
                                 num_prefix_tokens=vit.num_prefix_tokens)
    return {**sd, "pos_embed": pos}


def _name_seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"promptcl-random-init:{name}".encode()).digest()[:8], "little")


def random_weights(name: str) -> dict[str, torch.Tensor]:
    """Random weights for backbone `name`, distributed as timm's ViT initialisation (its default
    mode: Linear weights and `pos_embed` truncated normal, std .02, within +-2; Linear biases 0;
    `cls_token` normal, std 1e-6; LayerNorm 1 and 0; the patch-embedding convolution as PyTorch
    initialises a Conv2d), drawn from a `torch.Generator` seeded by the name.

    Written out because timm's initialisers draw from the global RNG and take no generator:
    building through them would consume (or need to reseed) the caller's random stream."""
    g = torch.Generator().manual_seed(_name_seed(name))
    vit = skeleton(name).to_empty(device="cpu")
    init = torch.nn.init
    with torch.no_grad():
        for module_name, module in vit.named_modules():
            own = list(module.named_parameters(recurse=False))
            if not own:
                continue
            if isinstance(module, torch.nn.Linear):
                init.trunc_normal_(module.weight, std=0.02, a=-2.0, b=2.0, generator=g)
                if module.bias is not None:
                    init.zeros_(module.bias)
            elif isinstance(module, torch.nn.LayerNorm):
                init.ones_(module.weight)
                init.zeros_(module.bias)
            elif isinstance(module, torch.nn.Conv2d):
                init.kaiming_uniform_(module.weight, a=5 ** 0.5, generator=g)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    init.uniform_(module.bias, -fan_in ** -0.5, fan_in ** -0.5, generator=g)
            elif module is vit:
                for pname, p in own:
                    if pname == "pos_embed":
                        init.trunc_normal_(p, std=0.02, a=-2.0, b=2.0, generator=g)
                    elif pname == "cls_token":
                        init.normal_(p, std=1e-6, generator=g)
                    else:
                        raise BackboneError(f"random_weights({name!r}): no initialiser for {pname}")
            else:
                raise BackboneError(f"random_weights({name!r}): no initialiser for module "
                                    f"{module_name} ({type(module).__name__})")
    return vit.state_dict()
