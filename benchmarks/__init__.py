"""Data for promptcl: readers of the real on-disk formats, class orders and Avalanche streams.

``build_stream`` is the one entry point the runner uses (docs/CONTRACTS.md); the readers
(``load_*``) and ``subsample_indices`` / ``unused_indices`` are public for scripts that need the
same bytes outside a stream (e.g. pretraining the tiny backbone on images the stream never uses).
``benchmarks.synthetic`` writes tiny data sets in the real on-disk formats for tests and smoke runs.
Errors a user can fix: ``DataNotFoundError`` (data not on disk) and ``DataError`` (a file that is
there but truncated, corrupt or refused); both name the file and what to do.
This package never imports ``methods``, ``protocols`` or ``leaderboard``.
"""

from .cifar100 import load_cifar100
from .common import DataError, DataNotFoundError, LoadedData
from .cub200 import load_cub200
from .facts import DATASET_FACTS, DatasetFacts, dataset_facts
from .fashion_mnist import load_fashion_mnist
from .imagenet_r import CODA_SPLIT_SHA256, load_imagenet_r
from .streams import (DATASETS, SAMPLE_INDEX, SUBSAMPLE_SEED, StreamInfo, build_stream, class_order,
                      classes_per_exp, subsample_indices, unused_indices)
from .transforms import build_transforms

__all__ = [
    "CODA_SPLIT_SHA256", "DATASETS", "DATASET_FACTS", "DataError", "DataNotFoundError", "DatasetFacts",
    "LoadedData", "SAMPLE_INDEX", "StreamInfo", "SUBSAMPLE_SEED", "build_stream", "build_transforms", "class_order",
    "classes_per_exp", "load_cifar100", "load_cub200",
    "load_fashion_mnist", "load_imagenet_r", "subsample_indices", "unused_indices",
]
