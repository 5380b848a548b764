"""The data sets' own constants, in one place: what a protocol is validated against and what a
cost estimate counts, without reading any data.

Sizes are the official splits (ImageNet-R: the 80/20 file lists of the CODA-Prompt / VQ-Prompt /
SMoPE code, 24,000 / 6,000 of its 30,000 images; the suite's own stratified split has the same
totals up to rounding per class).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetFacts:
    num_classes: int
    num_train: int
    num_test: int


DATASET_FACTS: dict[str, DatasetFacts] = {
    "fashion_mnist": DatasetFacts(num_classes=10, num_train=60_000, num_test=10_000),
    "cifar100": DatasetFacts(num_classes=100, num_train=50_000, num_test=10_000),
    "imagenet_r": DatasetFacts(num_classes=200, num_train=24_000, num_test=6_000),
    "cub200": DatasetFacts(num_classes=200, num_train=5_994, num_test=5_794),
}
