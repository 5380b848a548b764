"""The device a run uses: `--device` resolved and checked, GPUs per run checked, and the names
profile and smoke records carry.

Why one module: the runner, the executors, a sweep's checks, the profile and the dry-run
estimate all ask these questions; each asked them in its own module before, and one imported
another's private check.
"""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

from .errors import SweepError


def resolve_device(device: str) -> torch.device:
    """"auto": cuda if available, else cpu; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_device(device: str, executor: str = "local") -> None:
    """Refuse a `--device` that does not exist here (SweepError). Runs elsewhere (Ray, Slurm) land
    on machines of their own, so only the name is checked for them."""
    if device == "auto":
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise SweepError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise SweepError(f"--device {device!r}: the suite runs on cpu or cuda (or mps); use one of them")
    if executor not in ("local", "processes"):
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SweepError(f"--device {device}: no CUDA GPU is visible here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SweepError(f"--device {device}: this machine has {torch.cuda.device_count()} GPU(s) "
                             f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SweepError(f"--device {device}: no Apple MPS device here; use --device cpu (or auto)")


def wants_gpu(device: str) -> bool:
    """Whether a run on `device` runs on a GPU of the node it lands on ("auto" picks CUDA there)."""
    return device == "auto" or device.startswith("cuda")


def check_gpus(device: str, gpus_per_run: float | None) -> None:
    """Refuse a `--gpus-per-run` that contradicts `--device` (SweepError); None: not given."""
    if gpus_per_run is None:
        return
    if gpus_per_run < 0:
        raise SweepError(f"--gpus-per-run {gpus_per_run}: give 0 or more GPUs per run")
    if gpus_per_run > 0 and not wants_gpu(device):
        raise SweepError(f"--gpus-per-run {gpus_per_run} asks for GPUs but --device {device} "
                         f"runs on the CPU; drop --gpus-per-run or use --device cuda")
    if gpus_per_run == 0 and device.startswith("cuda"):
        raise SweepError(f"--gpus-per-run 0 with --device {device}: a CUDA run needs a GPU; "
                         f"use --device cpu or give --gpus-per-run 1")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """"cpu (2 cores, AMD EPYC)" or "cuda:0 (NVIDIA H200)": what a profile or smoke record was
    measured on."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({os.cpu_count()} cores, {_cpu_model()})"


def device_slug(name: str) -> str:
    """File-name form of a device name: "cpu-2-cores-amd-epyc"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
