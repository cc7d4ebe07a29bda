"""Serving the MoPE predictors inside a scheduler: an exported ONNX model run by onnxruntime (no training framework
at run time), or, when no trained model is given, each client's recent history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from fairness.core.features import FEATURES, TARGETS
from fairness.extras import missing


class Predictor(Protocol):
    """Maps [N, F] features (`features.FEATURES`) to [N, T] predictions (`features.TARGETS`)."""

    def predict(self, x: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """A MoPE exported by `fairness.mope.train(...).export(path)`, run with onnxruntime on one thread (sequential,
    so every call with the same input gives the same output)."""

    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise missing("mope", e) from e

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"MoPE model {path} does not exist; train one with fairness.mope.train(...)")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ValueError(f"{path} is not a loadable ONNX model ({type(e).__name__}: {e})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        features, targets = json.loads(meta.get("features", "null")), json.loads(meta.get("targets", "null"))
        if features != list(FEATURES) or targets != list(TARGETS):
            raise ValueError(
                f"{path} was trained for features {features} and targets {targets}; this version of fairness "
                f"computes {list(FEATURES)} -> {list(TARGETS)}: retrain it with fairness.mope.train(...)"
            )
        self.experts = int(meta.get("experts", "0"))
        self._input = self.session.get_inputs()[0].name

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float64).reshape(-1, len(FEATURES))  # [N, F]
        return self.session.run(None, {self._input: x})[0]  # [N, T]


class HistoryPredictor:
    """The fallback when no trained MoPE is given: output tokens = the client's recent mean (else all clients',
    else `default_tokens`); latencies, throughput and utilisation unknown (NaN)."""

    def __init__(self, default_tokens: float = 256.0):
        self.default_tokens = default_tokens

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64).reshape(-1, len(FEATURES))
        client = x[:, FEATURES.index("log_client_mean_output")]
        everyone = x[:, FEATURES.index("log_global_mean_output")]
        out = np.where(client > 0, np.expm1(client), np.where(everyone > 0, np.expm1(everyone), self.default_tokens))
        y = np.full((len(x), len(TARGETS)), np.nan)
        y[:, 0] = out
        return y
