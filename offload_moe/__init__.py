"""offload-moe: run Mixture-of-Experts models whose experts do not fit in GPU memory."""

from .calibrate import Calibration, calibrate, load_calibration
from .errors import BudgetError, UnsupportedModelError
from .eviction import LFU, LRU, EvictionPolicy
from .handle import LayerStats, OffloadHandle, OffloadStats, handle_of
from .host import EmulatedHost
from .load import load
from .options import OffloadOptions
from .patch import patch
from .plan import ExpertGeometry, Plan, make_plan
from .transfer import EmulatedLink

__all__ = [
    "BudgetError",
    "Calibration",
    "EmulatedHost",
    "EmulatedLink",
    "EvictionPolicy",
    "ExpertGeometry",
    "LFU",
    "LRU",
    "LayerStats",
    "OffloadHandle",
    "OffloadOptions",
    "OffloadStats",
    "Plan",
    "UnsupportedModelError",
    "calibrate",
    "handle_of",
    "load",
    "load_calibration",
    "make_plan",
    "patch",
]
