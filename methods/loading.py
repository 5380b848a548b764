"""Every DataLoader of a run, built one way: worker processes, pinned memory on CUDA, and batches
that do not depend on the number of workers.

torch's DataLoader does the loading; this module only decides where its randomness comes from,
because with torch's defaults the batches (and every number after them) change with the worker
count: a loader draws its workers' base seed from the global RNG at each new iterator, persistent
workers skip that draw (shifting the global RNG, hence the next epoch's shuffle), and a random
augmentation running in a worker draws from that worker's own RNG instead of the main process's.
Here, instead:

- each pass over a loader draws one 64-bit *pass seed* from the global torch RNG in the main
  process, at the point where the loader's own base-seed draw used to happen (that draw now goes
  to a private generator); the shuffle then draws its seed from the global RNG as before. So the
  global RNG sees the same draws whatever the worker count and persistence, and with 0 workers
  exactly the draws Avalanche's loaders made: a run without random augmentation is unchanged.
- sample i of a pass is loaded with torch's CPU RNG seeded from (pass seed, i) and restored
  afterwards, so a random transform (torchvision's RandomResizedCrop and flips draw from torch's
  RNG) gives the same pixels in the main process or in any worker, and never consumes the global
  stream. Random transforms must draw from torch's RNG, not Python's ``random`` or numpy's.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

_MASK64 = (1 << 64) - 1


def usable_cpus() -> int:
    """CPU cores this process may run on (the affinity mask, e.g. a Slurm allocation)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_loader_workers(device: str | torch.device) -> int:
    """0 on CPU; on an accelerator min(8, cores - 1).

    On CPU the training step runs on the same cores that would decode, so workers only take cores
    from torch's threads (and the default 28 px tensors cost microseconds a sample). On a GPU the
    host only feeds it: one core stays with the training loop, and 8 workers decode and crop
    ImageNet-R-sized JPEGs faster than a ViT-B/16 trains on them (`run_suite.py profile` measures
    the loader's images/s per worker)."""
    if torch.device(device).type == "cpu":
        return 0
    return max(0, min(8, usable_cpus() - 1))


def sample_seed(pass_seed: int, index: int) -> int:
    """SplitMix64 of (pass seed, sample index): well-mixed 64 bits (torch's CPU generator keeps
    only the low 32 of its seed, so neighbouring indices must differ there too)."""
    z = (pass_seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SeededSamples(Dataset):
    """``dataset`` indexed by (pass seed, i): item i loaded under a torch RNG seeded for it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        pass_seed, i = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(sample_seed(pass_seed, i))  # CPU only, never CUDA's
        try:
            return self.dataset[i]
        finally:
            torch.set_rng_state(state)


class SeededBatches(Sampler):
    """Batches of (pass seed, index): one pass seed drawn from the global RNG per pass, then the
    wrapped batch sampler (whose shuffle draws its own seed from the global RNG, as before)."""

    def __init__(self, batches: BatchSampler):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        # the draw torch's DataLoader makes for its base seed at each new iterator
        pass_seed = int(torch.empty((), dtype=torch.int64).random_().item())
        for batch in self.batches:
            yield [(pass_seed, i) for i in batch]


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool = False, drop_last: bool = False,
                workers: int = 0, pin_memory: bool = False, persistent: bool = False,
                collate_fn: Callable[[Sequence[Any]], Any] | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` whose batches do not depend on ``workers`` (module docstring).

    ``persistent`` keeps the workers between passes (for a loader iterated once per epoch);
    ``pin_memory`` for host-to-GPU copies with ``non_blocking=True``."""
    if workers < 0:
        raise ValueError(f"loader workers must be >= 0, got {workers}")
    order = RandomSampler(dataset) if shuffle else SequentialSampler(dataset)  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    if collate_fn is not None:
        kwargs["collate_fn"] = collate_fn
    return DataLoader(
        SeededSamples(dataset), batch_sampler=SeededBatches(BatchSampler(order, batch_size, drop_last)),
        num_workers=workers, pin_memory=pin_memory, persistent_workers=persistent and workers > 0,
        # the loader's own base-seed draw: a private generator, so it never moves the global RNG
        # (worker RNGs no longer matter: every sample is seeded by SeededSamples)
        generator=torch.Generator().manual_seed(0), **kwargs)
