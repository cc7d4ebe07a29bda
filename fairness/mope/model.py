"""MoPE: a deterministic Mixture of Prediction Experts that predicts, when a request arrives, its output tokens,
TTFT, end-to-end latency, the decode throughput it will get and the compute utilisation of the batches it joins.

    data = mope.collect(requests, engine)               # simulator (or engine) logs: features at arrival, outcomes
    train, test = data.split(0.7)                        # by arrival time: disjoint parts
    model = mope.train(train, experts=3)                 # torch, seeded
    model.export("mope.onnx")                            # the scheduler serves it with onnxruntime
    mope.l1_errors(OnnxPredictor("mope.onnx"), test)

Each expert is a small MLP over standardised features (clamped to the range seen in training) predicting log1p of
every target. The gate is a small MLP whose softmax weights mix the experts' outputs: a fixed function of the input,
so the same features give the same prediction every time. The mixture is one torch module (`MoPE`); its ONNX export
is built from that module's weights and tested for parity against it. Training first specialises expert e on the e-th
output-length regime (quantiles of the training outputs) and teaches the gate to recognise the regimes, then
fine-tunes all of it end to end on the L1 error in log space (a conditional median, which is what minimises L1 error
in tokens). Computation is in float64.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fairness.core.driver import EngineObserver
from fairness.core.engine_model import EngineModel
from fairness.core.features import FEATURES, TARGETS, LoadTracker
from fairness.core.policy import SchedulingPolicy
from fairness.core.predictor import Predictor
from fairness.core.request import Request, RequestInfo
from fairness.core.telemetry import Telemetry
from fairness.sim.simulator import simulate

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


class _Recorder(EngineObserver):
    """Logs, per request, the features at arrival and what happened to it."""

    def __init__(self) -> None:
        self.load = LoadTracker()
        self.telemetry: Telemetry | None = None
        self.rows: dict[int, dict] = {}

    def on_start(self, engine: EngineModel, telemetry: Telemetry) -> None:
        self.telemetry = telemetry

    def on_arrival(self, req: RequestInfo, now: float) -> None:
        self.rows[req.id] = {"x": self.load.features(req), "arrival": now, "util": []}
        self.load.arrive(req)

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self.load.admit(req, req.input_tokens + self.rows[req.id].get("generated", 0))
        self.rows[req.id].setdefault("admit", now)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        self.load.step(generated)
        sample = self.telemetry.latest() if self.telemetry else None
        for rid, n in generated.items():
            row = self.rows[rid]
            row.setdefault("first", now)
            row["generated"] = row.get("generated", 0) + n
            if sample is not None:
                row["util"].append(sample.gpu_util)

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

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self.load.preempt(req)


def collect(
    requests: list[Request],
    engine: EngineModel | None = None,
    policy: str | SchedulingPolicy = "vtc",
    source: str = "workload",
    until_s: float | None = None,
) -> Dataset:
    """Run `requests` through the simulator under `policy` and log every finished request (training data)."""
    rec = _Recorder()
    simulate(requests, policy, engine=engine, until_s=until_s, observers=[rec])
    rows = [r for r in rec.rows.values() if "y" in r]
    if not rows:
        raise ValueError(f"no request of {source!r} finished: nothing to learn from (run longer or with less load)")
    return Dataset(
        np.array([r["x"] for r in rows]),
        np.array([r["y"] for r in rows], dtype=np.float64),
        np.array([r["arrival"] for r in rows]),
        np.array([source] * len(rows)),
    )


class MoPE(torch.nn.Module):
    """The mixture: `experts` MLPs over standardised features (clamped to the training range) predicting log1p of
    every target, mixed by a softmax gate. `experts=1` is the single-regressor baseline. float64 throughout.

    forward(x [N, F] raw features) -> [N, T] predictions in log1p space; `predict` gives them in target units.
    """

    def __init__(self, experts: int, hidden: int, generator: torch.Generator | None = None):
        super().__init__()
        f, t, e = len(FEATURES), len(TARGETS), experts
        self.experts = experts

        def init(*shape: int) -> torch.nn.Parameter:
            w = torch.randn(*shape, generator=generator, dtype=torch.float64) * (2.0 / shape[-2]) ** 0.5
            return torch.nn.Parameter(w)

        def zeros(*shape: int) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.zeros(*shape, dtype=torch.float64))

        self.w1, self.b1 = init(e, f, hidden), zeros(e, 1, hidden)  # experts: [E, F, H] ...
        self.w2, self.b2 = init(e, hidden, hidden), zeros(e, 1, hidden)
        self.w3, self.b3 = init(e, hidden, t), zeros(e, 1, t)  # ... -> [E, N, T]
        self.g1, self.gb1 = init(f, hidden), zeros(hidden)  # gate: [F, H] -> [H, E]
        self.g2, self.gb2 = init(hidden, e), zeros(e)
        for name in ("mean", "std", "zmin", "zmax"):  # input standardisation and the training range, [F]
            self.register_buffer(name, torch.zeros(f, dtype=torch.float64))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.std).clamp(self.zmin, self.zmax)  # [N, F]

    def experts_out(self, z: torch.Tensor) -> torch.Tensor:
        h = torch.relu(torch.einsum("nf,efh->enh", z, self.w1) + self.b1)
        h = torch.relu(torch.einsum("enh,ehk->enk", h, self.w2) + self.b2)
        return torch.einsum("enh,eht->ent", h, self.w3) + self.b3  # [E, N, T]

    def gate_logits(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z @ self.g1 + self.gb1) @ self.g2 + self.gb2  # [N, E]

    def mix(self, z: torch.Tensor) -> torch.Tensor:
        g = torch.softmax(self.gate_logits(z), dim=1)  # [N, E]
        return torch.einsum("ne,ent->nt", g, self.experts_out(z))  # [N, T]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.standardise(x))

    @torch.no_grad()
    def predict(self, x: np.ndarray) -> np.ndarray:
        """[N, T] predictions in target units (tokens, seconds, ...)."""
        raw = self(torch.as_tensor(np.asarray(x, dtype=np.float64)))
        return torch.expm1(raw).clamp_min(0.0).numpy()

    def export(self, path: str | Path) -> Path:
        """Write the mixture as one ONNX graph: raw features in, [N, T] predictions out."""
        from fairness.mope.onnx_export import to_onnx

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        params = {k: v.detach().numpy() for k, v in self.state_dict().items()}
        meta = {
            "features": json.dumps(list(FEATURES)),
            "targets": json.dumps(list(TARGETS)),
            "experts": str(self.experts),
        }
        path.write_bytes(to_onnx(params, meta).SerializeToString())
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
    if experts < 1 or hidden < 1 or steps < 1:
        raise ValueError("experts, hidden and steps must all be >= 1")
    if len(data) < 10 * experts:
        raise ValueError(f"{len(data)} rows are too few to train {experts} experts; collect more (>= {10 * experts})")
    model = MoPE(experts, hidden, torch.Generator().manual_seed(seed))
    x = torch.tensor(data.x, dtype=torch.float64)
    y = torch.log1p(torch.tensor(data.y, dtype=torch.float64).clamp_min(0))  # [N, T]
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    with torch.no_grad():
        model.mean.copy_(mean)
        model.std.copy_(std)
        model.zmin.copy_(z.min(0).values)  # inputs are clamped to the training range: no wild extrapolation
        model.zmax.copy_(z.max(0).values)
        model.b3 += y.median(0).values  # start every expert at the overall median
    w = torch.tensor(TARGET_WEIGHTS, dtype=torch.float64)

    def fit(params: list[torch.nn.Parameter], loss_fn, n: int, rate: float) -> None:
        opt = torch.optim.Adam(params, lr=rate)
        for _ in range(n):
            opt.zero_grad()
            loss_fn().backward()
            opt.step()

    m = model
    if experts > 1:  # 1) specialise: expert k learns the k-th output-length regime, the gate learns to tell them apart
        edges = torch.quantile(y[:, 0], torch.linspace(0, 1, experts + 1, dtype=torch.float64)[1:-1])
        regime = torch.bucketize(y[:, 0].contiguous(), edges)  # [N]
        rows = torch.arange(len(z))
        fit(
            [m.w1, m.b1, m.w2, m.b2, m.w3, m.b3],
            lambda: ((m.experts_out(z)[regime, rows] - y).abs() * w).mean(),
            steps,
            lr,
        )
        fit([m.g1, m.gb1, m.g2, m.gb2], lambda: torch.nn.functional.cross_entropy(m.gate_logits(z), regime), steps, lr)
    # 2) end to end: L1 of the gated mixture in log space
    fit(list(m.parameters()), lambda: ((m.mix(z) - y).abs() * w).mean(), steps, lr if experts == 1 else lr / 3)
    return model.eval()


def l1_errors(model: Predictor, data: Dataset) -> dict[str, float]:
    """Mean absolute error of each target on `data` (output tokens in tokens, latencies in seconds); NaN for targets
    the model does not predict."""
    err = np.abs(model.predict(data.x) - data.y)  # [N, T]
    return {name: float(err[:, i].mean()) for i, name in enumerate(TARGETS)}
