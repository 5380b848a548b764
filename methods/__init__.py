"""What learns: the shared prompted ViT, the backbone registry, the base strategy, the methods."""
from .base import Hparams, PromptModel, PromptStrategy, added_hparam, hparam
from .registry import (HparamError, PluginError, UnknownMethodError, ablation, create, get, has_defaults,
                       load_plugin, names, register, resolve_hparams)
from .vit import PromptedViT

__all__ = ["HparamError", "Hparams", "added_hparam", "hparam", "PluginError", "PromptModel",
           "PromptStrategy", "PromptedViT", "UnknownMethodError", "ablation", "create", "get", "has_defaults", "load_plugin", "names",
           "register", "resolve_hparams"]
