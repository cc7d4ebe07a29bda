"""offload-moe: run Mixture-of-Experts models whose experts do not fit in GPU memory."""

from hooks import UnsupportedModelError

from .eviction import LFU, LRU, EvictionPolicy
from .load import load
from .patch import OffloadHandle, patch
from .transfer import EmulatedLink

__all__ = ["LFU", "LRU", "EmulatedLink", "EvictionPolicy", "OffloadHandle", "UnsupportedModelError", "load", "patch"]
