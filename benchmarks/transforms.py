"""Train / eval transforms: one pipeline per (backbone resolution, channels, normalisation).

Every method sees the same pipeline (the suite's rule: one data pipeline for all). Geometry follows
the reference code (docs/sources.md#preprocessing); then the image becomes a float tensor in [0, 1],
its channels are matched to the
backbone, and it is normalised unless mean 0 / std 1 (the CODA / VQ / SMoPE convention).

Choices the reference code leaves open:
- ``"resize"`` (eval) and ``"none"`` (train) resize to a square ``(S, S)``, not the shorter side to
  S: identical for square data (CIFAR, Fashion-MNIST) and batchable for photos of any shape.
- ``"resize_crop"`` = ``Resize(int(S * 256 / 224))`` (shorter side) + ``CenterCrop(S)``.
- Interpolation is torchvision's default (bilinear, antialiased), as in the reference code.
- RGB -> 1 channel uses the ITU-R 601 luma weights (``rgb_to_grayscale``); 1 -> 3 repeats the plane.
- Inputs may be PIL images or uint8 C x H x W tensors; the tensor form with no geometry costs
  only a dtype conversion per sample (the Fashion-MNIST / tiny-backbone path).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

AUGMENTS = ("none", "rrc_flip")
EVAL_RESIZES = ("resize", "resize_crop")


class ToFloatTensor:
    """PIL image -> ToTensor; uint8 tensor -> float in [0, 1] (no PIL round trip)."""

    def __call__(self, x):
        if isinstance(x, torch.Tensor):
            if x.dtype == torch.uint8:
                return x.to(torch.float32).div_(255.0)
            return x.to(torch.float32)
        return F.to_tensor(x)

    def __repr__(self) -> str:
        return "ToFloatTensor()"


class MatchChannels:
    """Make a C x H x W tensor have the backbone's channel count (1 <-> 3)."""

    def __init__(self, in_chans: int):
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        self.in_chans = in_chans

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-3]
        if c == self.in_chans:
            return x
        if c == 1 and self.in_chans == 3:
            return x.repeat(*([1] * (x.dim() - 3)), 3, 1, 1)  # a copy: later in-place ops stay safe
        if c == 3 and self.in_chans == 1:
            return F.rgb_to_grayscale(x, num_output_channels=1)
        raise ValueError(f"cannot map {c} channels to {self.in_chans}")

    def __repr__(self) -> str:
        return f"MatchChannels(in_chans={self.in_chans})"


def is_identity_norm(mean: Sequence[float], std: Sequence[float]) -> bool:
    return all(float(m) == 0.0 for m in mean) and all(float(s) == 1.0 for s in std)


def train_geometry(image_size: int, augment: str, native_size: int | None) -> list:
    if augment == "rrc_flip":
        return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    if augment == "none":
        return [] if native_size == image_size else [T.Resize((image_size, image_size))]
    raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")


def eval_geometry(image_size: int, eval_resize: str, native_size: int | None) -> list:
    if eval_resize == "resize":
        return [] if native_size == image_size else [T.Resize((image_size, image_size))]
    if eval_resize == "resize_crop":
        return [T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size)]
    raise ValueError(f"eval_resize must be one of {EVAL_RESIZES}, got {eval_resize!r}")


def needs_geometry(image_size: int, augment: str, eval_resize: str, native_size: int | None) -> bool:
    """True when either pipeline resizes, crops or flips (then readers should hand out PIL images)."""
    return bool(train_geometry(image_size, augment, native_size) or eval_geometry(image_size, eval_resize, native_size))


def _tail(in_chans: int, mean: Sequence[float], std: Sequence[float]) -> list:
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) not in (1, in_chans) or len(std) not in (1, in_chans):
        raise ValueError(f"mean/std need 1 or {in_chans} values, got {mean} / {std}")
    out: list = [ToFloatTensor(), MatchChannels(in_chans)]
    if not is_identity_norm(mean, std):
        out.append(T.Normalize(mean, std))
    return out


def build_transforms(image_size: int, in_chans: int, mean: Sequence[float], std: Sequence[float],
                     augment: str = "none", eval_resize: str = "resize",
                     native_size: int | None = None) -> tuple[Callable, Callable]:
    """(train, eval) transforms; ``native_size`` is the data's square side, None for variable size."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    tail = _tail(in_chans, mean, std)
    train = T.Compose(train_geometry(image_size, augment, native_size) + tail)
    ev = T.Compose(eval_geometry(image_size, eval_resize, native_size) + list(tail))
    return train, ev
