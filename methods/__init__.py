"""What learns: the shared prompted ViT, the backbone registry, the base strategy, the methods."""
from .base import Hparams, PromptModel, PromptStrategy
from .registry import create, get, load_plugin, names, register, resolve_hparams
from .vit import PromptedViT

__all__ = ["Hparams", "PromptModel", "PromptStrategy", "PromptedViT", "create", "get",
           "load_plugin", "names", "register", "resolve_hparams"]
