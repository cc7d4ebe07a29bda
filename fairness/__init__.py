"""fairness: fair, efficient scheduling for LLM serving: a scheduler plug-in API, FCFS / RPM / VTC / Equinox
policies, MoPE predictors served with onnxruntime, NVML telemetry, a continuous-batching engine simulator, workloads
and fairness metrics."""

from . import baselines as _baselines  # noqa: F401  (registers fcfs, rpm, vtc, lcf, vtc-pred, vtc-oracle)
from . import equinox as _equinox  # noqa: F401  (registers "equinox")
from .engine import PRESETS, EngineModel
from .equinox import Equinox
from .ledger import Backlog, Ledger
from .policy import SchedulingPolicy, make_policy, policy_names, register_policy
from .predictor import HistoryPredictor, OnnxPredictor
from .request import Request, RequestInfo
from .simulator import SimObserver, SimResult, Simulator, simulate
from .telemetry import GPUSample, Telemetry
from .workloads import (
    TraceFormatError,
    bundled_trace,
    load_azure_csv,
    load_jsonl,
    load_sharegpt,
    load_trace,
    make_workload,
)

__all__ = [
    "Backlog",
    "EngineModel",
    "Equinox",
    "GPUSample",
    "HistoryPredictor",
    "Ledger",
    "OnnxPredictor",
    "PRESETS",
    "Request",
    "RequestInfo",
    "SchedulingPolicy",
    "SimObserver",
    "SimResult",
    "Simulator",
    "Telemetry",
    "TraceFormatError",
    "bundled_trace",
    "load_azure_csv",
    "load_jsonl",
    "load_sharegpt",
    "load_trace",
    "make_policy",
    "make_workload",
    "policy_names",
    "register_policy",
    "simulate",
]
