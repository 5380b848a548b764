"""What learns: the shared prompted ViT, the backbone registry, the base strategy, the methods.

Everything a method plugin needs is importable from here (docs/writing-a-method.md)."""
from .alignment import AlignmentConfig, AlignmentStage, ClassStatistics, align_classifier, collect_features
from .base import Hparams, PromptModel, PromptStrategy, TaskStages, added_hparam, hparam
from .registry import (HparamError, PluginError, UnknownMethodError, ablation, create, get, has_defaults,
                       load_plugin, names, register, resolve_hparams)
from .vit import PromptedViT

__all__ = ["AlignmentConfig", "AlignmentStage", "ClassStatistics", "HparamError", "Hparams", "PluginError", "PromptModel",
           "PromptStrategy", "PromptedViT", "TaskStages", "UnknownMethodError", "ablation", "added_hparam",
           "align_classifier", "collect_features", "create", "get", "has_defaults", "hparam", "load_plugin",
           "names", "register", "resolve_hparams"]
