"""offload-moe: run Mixture-of-Experts models whose experts do not fit in GPU memory."""

from hooks import UnsupportedModelError

from .calibrate import Calibration, calibrate, load_calibration
from .eviction import LFU, LRU, EvictionPolicy
from .load import load
from .patch import OffloadHandle, patch
from .transfer import EmulatedLink

__all__ = [
    "Calibration",
    "calibrate",
    "load_calibration",
    "LFU",
    "LRU",
    "EmulatedLink",
    "EvictionPolicy",
    "OffloadHandle",
    "UnsupportedModelError",
    "load",
    "patch",
]
