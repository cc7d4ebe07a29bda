"""The thin layer that attaches to `torch.nn.Module`s: find MoE blocks, attach/detach hooks, capture routing."""

from .module_hooks import ModuleHook, attach, attached_hook, detach, is_attached
from .moe import MoEBlock, find_moe_blocks, is_stacked_experts
from .routing import RoutingRecorder, RoutingTrace
from .versions import IncompatibleVersionError

__all__ = [
    "IncompatibleVersionError",
    "MoEBlock",
    "ModuleHook",
    "RoutingRecorder",
    "RoutingTrace",
    "attach",
    "attached_hook",
    "detach",
    "find_moe_blocks",
    "is_attached",
    "is_stacked_experts",
]
