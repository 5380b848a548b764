"""The data sets' own constants: class count and official train / test sizes, in one place.

What a protocol is checked against (a task count must divide into the classes) and what a cost
estimate multiplies (images per epoch, test images per evaluation) before any file is read. The
sizes are those of the official splits; ImageNet-R has none, so its sizes are the CODA-Prompt
80/20 split of its 30,000 images that the SMoPE, CODA-Prompt and VQ-Prompt numbers use.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    num_classes: int
    train_size: int  # images in the official training split
    test_size: int  # images in the official test split
    split: str  # where the split comes from


DATASET_FACTS: dict[str, DatasetFacts] = {
    "fashion_mnist": DatasetFacts(10, 60_000, 10_000, "official train / t10k files"),
    "cifar100": DatasetFacts(100, 50_000, 10_000, "official train / test pickles"),
    "imagenet_r": DatasetFacts(200, 24_000, 6_000, "CODA-Prompt 80/20 split of the 30,000 images"),
    "cub200": DatasetFacts(200, 5_994, 5_794, "official train_test_split.txt"),
}


def dataset_facts(dataset: str) -> DatasetFacts:
    """The constants of `dataset` (a `DATASETS` name)."""
    try:
        return DATASET_FACTS[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASET_FACTS)}") from None
