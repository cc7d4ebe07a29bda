"""fairness: fair, efficient scheduling for LLM serving: a scheduler plug-in API, FCFS / RPM / VTC / Equinox
policies, MoPE predictors served with onnxruntime, NVML telemetry, a continuous-batching engine simulator, workloads
and fairness metrics."""

import fairness.core.baselines as _baselines  # noqa: F401  (registers fcfs, rpm, vtc, lcf, vtc-pred, vtc-oracle)
import fairness.core.equinox as _equinox  # noqa: F401  (registers "equinox")
from fairness.core.driver import EngineObserver, PolicyDriver
from fairness.core.engine_model import PRESETS, EngineModel
from fairness.core.equinox import Equinox
from fairness.core.ledger import Backlog, Ledger
from fairness.core.policy import SchedulingPolicy, make_policy, policy_names, register_policy, unregister_policy
from fairness.core.predictor import HistoryPredictor, OnnxPredictor
from fairness.core.request import Request, RequestInfo
from fairness.core.telemetry import GPUSample, Telemetry
from fairness.sim.simulator import SimResult, Simulator, simulate
from fairness.sim.workloads import (
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
    "PolicyDriver",
    "Request",
    "RequestInfo",
    "SchedulingPolicy",
    "EngineObserver",
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
    "unregister_policy",
]
