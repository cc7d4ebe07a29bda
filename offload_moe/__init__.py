"""offload-moe: run Mixture-of-Experts models whose experts do not fit in GPU memory."""

from offload_moe.calibration import Calibration, calibrate, load_calibration
from offload_moe.errors import BudgetError, UnsupportedModelError
from offload_moe.fit_plan import FitPlan, fit
from offload_moe.geometry import ExpertGeometry
from offload_moe.handle import LayerStats, OffloadHandle, OffloadStats, handle_of
from offload_moe.load import load
from offload_moe.options import OffloadOptions
from offload_moe.patch import patch
from offload_moe.plan import Plan, make_plan
from offload_moe.runtime.eviction import LFU, LRU, EvictionPolicy

__all__ = [
    "BudgetError",
    "Calibration",
    "EvictionPolicy",
    "ExpertGeometry",
    "FitPlan",
    "LFU",
    "LRU",
    "LayerStats",
    "OffloadHandle",
    "OffloadOptions",
    "OffloadStats",
    "Plan",
    "UnsupportedModelError",
    "calibrate",
    "fit",
    "handle_of",
    "load",
    "load_calibration",
    "make_plan",
    "patch",
]
