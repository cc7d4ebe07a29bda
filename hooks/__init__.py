"""The thin layer that attaches to `torch.nn.Module`s: find MoE blocks, attach/detach hooks, capture routing."""

from .module_hooks import ModuleHook, attach, attached_hook, detach, is_attached
from .moe import MoEBlock, UnsupportedModelError, find_moe_blocks
from .routing import RoutingRecorder, RoutingTrace

__all__ = [
    "MoEBlock",
    "ModuleHook",
    "RoutingRecorder",
    "RoutingTrace",
    "UnsupportedModelError",
    "attach",
    "attached_hook",
    "detach",
    "find_moe_blocks",
    "is_attached",
]
