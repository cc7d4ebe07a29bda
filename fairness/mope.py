"""MoPE: a deterministic Mixture of Prediction Experts that predicts, when a request arrives, its output tokens,
TTFT, end-to-end latency, the decode throughput it will get and the compute utilisation of the batches it joins.

    data = mope.collect(requests, engine)               # simulator (or engine) logs: features at arrival, outcomes
    train, test = data.split(0.7)                        # by arrival time: disjoint parts
    model = mope.train(train, experts=3)                 # torch, seeded
    model.export("mope.onnx")                            # the scheduler serves it with onnxruntime
    mope.l1_errors(OnnxPredictor("mope.onnx"), test)

Each expert is a small MLP over standardised features (clamped to the range seen in training) predicting log1p of
every target. The gate is a small MLP whose softmax weights mix the experts' outputs: a fixed function of the input,
so the same features give the same prediction every time. Training first specialises expert e on the e-th
output-length regime (quantiles of the training outputs) and teaches the gate to recognise the regimes, then
fine-tunes all of it end to end on the L1 error in log space (a conditional median, which is what minimises L1 error
in tokens). Computation is in float64.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .engine import EngineModel
from .features import FEATURES, TARGETS, LoadTracker
from .policy import SchedulingPolicy, make_policy
from .request import Request, RequestInfo
from .simulator import simulate
from .telemetry import Telemetry

TARGET_WEIGHTS = (2.0, 1.0, 1.0, 1.0, 1.0)  # output tokens matter most: the counters charge them


@dataclass
class Dataset:
    """Features at arrival and outcomes, one row per finished request."""

    x: np.ndarray  # [N, F] float64, columns FEATURES
    y: np.ndarray  # [N, T] float64, columns TARGETS
    arrival_s: np.ndarray  # [N]
    source: np.ndarray  # [N] name of the workload each row came from

    def __len__(self) -> int:
        return len(self.x)

    def take(self, mask: np.ndarray) -> Dataset:
        return Dataset(self.x[mask], self.y[mask], self.arrival_s[mask], self.source[mask])

    def split(self, train_fraction: float = 0.7) -> tuple[Dataset, Dataset]:
        """Within each source, the earliest `train_fraction` of arrivals train, the rest test (no row in both)."""
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}")
        train = np.zeros(len(self), dtype=bool)
        for src in np.unique(self.source):
            idx = np.flatnonzero(self.source == src)
            cut = np.quantile(self.arrival_s[idx], train_fraction)
            train[idx[self.arrival_s[idx] <= cut]] = True
        return self.take(train), self.take(~train)

    @staticmethod
    def concat(parts: list[Dataset]) -> Dataset:
        if not parts:
            raise ValueError("Dataset.concat needs at least one dataset")
        return Dataset(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("x", "y", "arrival_s", "source")))


class _Recorder:
    """Wraps a policy and logs, per request, the features at arrival and what happened to it."""

    def __init__(self, inner: SchedulingPolicy):
        self.inner, self.name = inner, getattr(inner, "name", "recorded")
        self.load = LoadTracker()
        self.telemetry: Telemetry | None = None
        self.rows: dict[int, dict] = {}

    def configure(self, engine: EngineModel, telemetry: Telemetry) -> None:
        self.telemetry = telemetry
        if hasattr(self.inner, "configure"):
            self.inner.configure(engine, telemetry)

    def add_request(self, req: RequestInfo, now: float) -> None:
        self.rows[req.id] = {"x": self.load.features(req), "arrival": now, "util": []}
        self.load.arrive(req)
        self.inner.add_request(req, now)

    def next_request(self, now: float) -> RequestInfo | None:
        return self.inner.next_request(now)

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self.load.admit(req, req.input_tokens + self.rows[req.id].get("generated", 0))
        self.rows[req.id].setdefault("admit", now)
        self.inner.on_admit(req, now)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        self.load.step(generated)
        sample = self.telemetry.latest() if self.telemetry else None
        for rid, n in generated.items():
            row = self.rows[rid]
            row.setdefault("first", now)
            row["generated"] = row.get("generated", 0) + n
            if sample is not None:
                row["util"].append(sample.gpu_util)
        self.inner.on_step(generated, step_s, now)

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        self.load.finish(req, output_tokens)
        row = self.rows[req.id]
        row["y"] = [
            output_tokens,
            row["first"] - row["arrival"],
            now - row["arrival"],
            output_tokens / max(now - row["admit"], 1e-6),
            float(np.mean(row["util"])) if row["util"] else 0.0,
        ]
        self.inner.on_finish(req, output_tokens, now)

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        return self.inner.preemption_victim(running)

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self.load.preempt(req)
        self.inner.on_preempt(req, now)


def collect(
    requests: list[Request],
    engine: EngineModel | None = None,
    policy: str | SchedulingPolicy = "vtc",
    source: str = "workload",
    until_s: float | None = None,
) -> Dataset:
    """Run `requests` through the simulator under `policy` and log every finished request (training data)."""
    rec = _Recorder(make_policy(policy))
    simulate(requests, rec, engine=engine, until_s=until_s)
    rows = [r for r in rec.rows.values() if "y" in r]
    if not rows:
        raise ValueError(f"no request of {source!r} finished: nothing to learn from (run longer or with less load)")
    return Dataset(
        np.array([r["x"] for r in rows]),
        np.array([r["y"] for r in rows], dtype=np.float64),
        np.array([r["arrival"] for r in rows]),
        np.array([source] * len(rows)),
    )


class MoPE:
    """A trained mixture (numpy weights, float64). `experts=1` is the single-regressor baseline."""

    def __init__(self, params: dict[str, np.ndarray], experts: int):
        self.params, self.experts = params, experts

    def raw(self, x: np.ndarray) -> np.ndarray:
        """[N, T] predictions in log1p space, in numpy (the framework-free reference of the ONNX graph)."""
        p = self.params
        z = np.clip((np.asarray(x, dtype=np.float64) - p["mean"]) / p["std"], p["zmin"], p["zmax"])  # [N, F]
        h = np.maximum(np.einsum("nf,efh->enh", z, p["w1"]) + p["b1"], 0)  # [E, N, H]
        h = np.maximum(np.einsum("enh,ehk->enk", h, p["w2"]) + p["b2"], 0)  # [E, N, H]
        ye = np.einsum("enh,eht->ent", h, p["w3"]) + p["b3"]  # [E, N, T]
        g = np.maximum(z @ p["g1"] + p["gb1"], 0) @ p["g2"] + p["gb2"]  # [N, E]
        g = np.exp(g - g.max(axis=1, keepdims=True))
        g /= g.sum(axis=1, keepdims=True)
        return np.einsum("ne,ent->nt", g, ye)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.maximum(np.expm1(self.raw(x)), 0.0)

    def export(self, path: str | Path) -> Path:
        """Write the mixture as one ONNX graph: raw features in, [N, T] predictions out."""
        from .mope_onnx import to_onnx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"features": json.dumps(list(FEATURES)), "targets": json.dumps(list(TARGETS)),
                "experts": str(self.experts)}  # fmt: skip
        path.write_bytes(to_onnx(self.params, meta).SerializeToString())
        return path


def train(
    data: Dataset,
    experts: int = 3,
    hidden: int = 32,
    steps: int = 400,
    seed: int = 0,
    lr: float = 1e-2,
) -> MoPE:
    """Fit a MoPE (or, with experts=1, a single regressor) to `data`. Deterministic for a given seed and machine."""
    import torch

    if experts < 1 or hidden < 1 or steps < 1:
        raise ValueError("experts, hidden and steps must all be >= 1")
    if len(data) < 10 * experts:
        raise ValueError(f"{len(data)} rows are too few to train {experts} experts; collect more (>= {10 * experts})")
    f, t, e = len(FEATURES), len(TARGETS), experts
    x = torch.tensor(data.x, dtype=torch.float64)
    y = torch.log1p(torch.tensor(data.y, dtype=torch.float64).clamp_min(0))  # [N, T]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    zmin, zmax = z.min(0).values, z.max(0).values  # inputs are clamped to the training range: no wild extrapolation
    gen = torch.Generator().manual_seed(seed)

    def init(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.randn(*shape, generator=gen, dtype=torch.float64) * (2.0 / shape[-2]) ** 0.5)

    def zeros(*shape: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(torch.zeros(*shape, dtype=torch.float64))

    p = {"w1": init(e, f, hidden), "b1": zeros(e, 1, hidden), "w2": init(e, hidden, hidden), "b2": zeros(e, 1, hidden),
         "w3": init(e, hidden, t), "b3": zeros(e, 1, t), "g1": init(f, hidden), "gb1": zeros(hidden),
         "g2": init(hidden, e), "gb2": zeros(e)}  # fmt: skip
    with torch.no_grad():
        p["b3"] += y.median(0).values  # start every expert at the overall median
    w = torch.tensor(TARGET_WEIGHTS, dtype=torch.float64)

    def experts_out(zz: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("nf,efh->enh", zz, p["w1"]) + p["b1"])
        h = torch.relu(torch.einsum("enh,ehk->enk", h, p["w2"]) + p["b2"])
        return torch.einsum("enh,eht->ent", h, p["w3"]) + p["b3"]  # [E, N, T]

    def gate_logits(zz: torch.Tensor) -> torch.Tensor:
        return torch.relu(zz @ p["g1"] + p["gb1"]) @ p["g2"] + p["gb2"]  # [N, E]

    def fit(params: list[torch.nn.Parameter], loss_fn, n: int, rate: float) -> None:
        opt = torch.optim.Adam(params, lr=rate)
        for _ in range(n):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()

    if e > 1:  # 1) specialise: expert k learns the k-th output-length regime, the gate learns to tell them apart
        edges = torch.quantile(y[:, 0], torch.linspace(0, 1, e + 1, dtype=torch.float64)[1:-1])
        regime = torch.bucketize(y[:, 0].contiguous(), edges)  # [N]
        rows = torch.arange(len(z))
        expert_keys = ["w1", "b1", "w2", "b2", "w3", "b3"]
        fit([p[k] for k in expert_keys],
            lambda: ((experts_out(z)[regime, rows] - y).abs() * w).mean(), steps, lr)  # fmt: skip
        fit([p[k] for k in ("g1", "gb1", "g2", "gb2")],
            lambda: torch.nn.functional.cross_entropy(gate_logits(z), regime), steps, lr)  # fmt: skip

    def mixture_loss() -> torch.Tensor:  # 2) end to end: L1 of the gated mixture in log space
        g = torch.softmax(gate_logits(z), dim=1)  # [N, E]
        return ((torch.einsum("ne,ent->nt", g, experts_out(z)) - y).abs() * w).mean()

    fit(list(p.values()), mixture_loss, steps, lr if e == 1 else lr / 3)
    params = {k: v.detach().numpy().copy() for k, v in p.items()}
    params["mean"], params["std"] = mean.numpy().copy(), std.numpy().copy()
    params["zmin"], params["zmax"] = zmin.numpy().copy(), zmax.numpy().copy()
    return MoPE(params, e)


def l1_errors(model: MoPE | object, data: Dataset) -> dict[str, float]:
    """Mean absolute error of each target on `data` (output tokens in tokens, latencies in seconds); NaN for targets
    the model does not predict."""
    err = np.abs(model.predict(data.x) - data.y)  # [N, T]
    return {name: float(err[:, i].mean()) for i, name in enumerate(TARGETS)}
