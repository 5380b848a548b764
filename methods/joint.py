"""`joint`: the upper bound. The frozen backbone and a linear head trained once on the union of
all tasks (offline, all classes at once), as Avalanche's `JointTraining` does.

Its accuracy matrix comes from that single model: after "task i" it is evaluated on tasks 0..i
with the logits masked to the classes of those tasks, exactly as every other method is evaluated
at that step. Each column is then an upper bound for that step (so CAA is one too); its final
column is the usual joint-training accuracy.
"""
from __future__ import annotations

from typing import Iterator

from avalanche.benchmarks.utils.utils import concat_datasets

from .base import PromptStrategy, timed
from .head_only import HeadOnly
from .registry import register


@register("joint")
class Joint(PromptStrategy):
    description = "upper bound: frozen ViT + linear head trained on all tasks at once"
    DEFAULTS = HeadOnly.DEFAULTS  # the same learner and budget as the lower bound, trained offline
    passes_train = 1
    passes_test = 1
    role = "upper bound"

    def fit(self, train_stream, test_stream) -> Iterator[int]:
        """Train once on the whole stream, then evaluate "after task i" under the seen-classes
        mask of tasks 0..i, for every i."""
        self.seconds = {"train": 0.0, "eval": 0.0}
        with timed(self.seconds, "train"):
            self.train(list(train_stream), eval_streams=[])
        seen: set[int] = set()
        for i, exp in enumerate(test_stream):
            seen |= {int(c) for c in exp.classes_in_this_experience}
            self.seen_classes = sorted(seen)
            with timed(self.seconds, "eval"):
                self.eval(test_stream[:i + 1])
            yield i

    def train(self, experiences, eval_streams=None, **kwargs):
        """Train once on the concatenation of `experiences` (a list: the whole train stream)."""
        self._joint = list(experiences) if isinstance(experiences, (list, tuple)) else [experiences]
        classes = sorted({int(c) for e in self._joint for c in e.classes_in_this_experience})
        self._joint_classes = classes
        return super().train(self._joint[0], eval_streams=[] if eval_streams is None else eval_streams, **kwargs)

    def train_dataset_adaptation(self, **kwargs):
        self.adapted_dataset = concat_datasets([e.dataset for e in self._joint]).train()

    def check_model_and_optimizer(self, **kwargs):
        self.current_classes = list(self._joint_classes)
        self.seen_classes = list(self._joint_classes)
        super().check_model_and_optimizer(**kwargs)
