"""Workloads: seeded generators for VTC's synthetic suite, and loaders for real trace formats.

Loaders raise `TraceFormatError` (a ValueError) naming the file, the line and what is wrong.
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections.abc import Callable
from datetime import datetime
from importlib import resources
from pathlib import Path

from fairness.core.request import Request, estimate_tokens


class TraceFormatError(ValueError):
    """A trace file is not in the format its loader reads."""


# --- synthetic workloads (after VTC, OSDI 2024, section 5) ---------------------------------------------------------


def _poisson(rng: random.Random, rate_per_s: float, start: float, end: float) -> list[float]:
    times, t = [], start
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= end:
            return times
        times.append(t)


def _uniform(rate_per_s: float, start: float, end: float) -> list[float]:
    n = int((end - start) * rate_per_s)
    return [start + i / rate_per_s for i in range(n)]


def overload(duration_s: float = 600, seed: int = 0) -> list[Request]:
    """Two clients that together send ~1.7x what the a10g preset serves: A at 4 req/s, B at 2 (256 in, 256 out)."""
    reqs = [Request("A", t, 256, 256) for t in _uniform(4.0, 0, duration_s)]
    reqs += [Request("B", t, 256, 256) for t in _uniform(2.0, 0.1, duration_s)]
    return sorted(reqs, key=lambda r: r.arrival_s)


def proportional(duration_s: float = 600, seed: int = 0) -> list[Request]:
    """Four clients whose rates are 1:2:3:4 (Poisson, 5 req/s in all: over capacity; 256 in, 256 out)."""
    rng = random.Random(seed)
    reqs = []
    for i, name in enumerate("ABCD"):
        reqs += [Request(name, t, 256, 256) for t in _poisson(rng, 0.5 * (i + 1), 0, duration_s)]
    return sorted(reqs, key=lambda r: r.arrival_s)


def on_off(duration_s: float = 600, seed: int = 0, period_s: float = 60) -> list[Request]:
    """A sends steadily over capacity (4 req/s); B alternates `period_s` on (same rate) and `period_s` off."""
    reqs = [Request("A", t, 256, 256) for t in _uniform(4.0, 0, duration_s)]
    start = 0.0
    while start < duration_s:
        reqs += [Request("B", t, 256, 256) for t in _uniform(4.0, start + 0.1, min(start + period_s, duration_s))]
        start += 2 * period_s
    return sorted(reqs, key=lambda r: r.arrival_s)


def poisson_short_long(duration_s: float = 600, seed: int = 0) -> list[Request]:
    """Poisson arrivals; A sends short requests (64 in, 64 out) often (16/s), B long ones (1024 in, 512 out) rarely
    (1.5/s): equal demand in VTC's service units, together over capacity."""
    rng = random.Random(seed)
    reqs = [Request("A", t, 64, 64) for t in _poisson(rng, 16.0, 0, duration_s)]
    reqs += [Request("B", t, 1024, 512) for t in _poisson(rng, 1.5, 0, duration_s)]
    return sorted(reqs, key=lambda r: r.arrival_s)


def increasing(duration_s: float = 600, seed: int = 0) -> list[Request]:
    """A sends at a steady 2 req/s; B's rate grows linearly from 0 to 6 req/s over the run (256 in, 256 out)."""
    rng = random.Random(seed)
    reqs = [Request("A", t, 256, 256) for t in _poisson(rng, 2.0, 0, duration_s)]
    t = 0.0
    while True:  # thinning of a Poisson process with rate 6 t / duration
        t += rng.expovariate(6.0)
        if t >= duration_s:
            break
        if rng.random() < t / duration_s:
            reqs.append(Request("B", t, 256, 256))
    return sorted(reqs, key=lambda r: r.arrival_s)


def distribution_shift(duration_s: float = 600, seed: int = 0) -> list[Request]:
    """Three clients whose request sizes and rates change at a third and two thirds of the run."""
    rng = random.Random(seed)
    phases = [  # (rate per s, input, output) per client, per phase
        {"A": (4.0, 128, 128), "B": (1.0, 512, 512), "C": (2.0, 256, 64)},
        {"A": (1.0, 512, 512), "B": (4.0, 128, 128), "C": (2.0, 64, 256)},
        {"A": (2.0, 256, 256), "B": (2.0, 256, 256), "C": (6.0, 64, 64)},
    ]
    reqs = []
    for k, phase in enumerate(phases):
        start, end = k * duration_s / 3, (k + 1) * duration_s / 3
        for client, (rate, n_in, n_out) in phase.items():
            reqs += [Request(client, t, n_in, n_out) for t in _poisson(rng, rate, start, end)]
    return sorted(reqs, key=lambda r: r.arrival_s)


def sharegpt_like(duration_s: float = 600, seed: int = 0, clients: int = 8, rate_per_s: float = 6.0) -> list[Request]:
    """Poisson arrivals with ShareGPT-like lengths (log-normal: input median ~180, output median ~220 tokens, heavy
    tails, capped at 2048), spread over `clients` clients with Zipf(1) shares."""
    rng = random.Random(seed)
    shares = _zipf_shares(clients)
    names = [f"client-{i}" for i in range(clients)]
    reqs = []
    for t in _poisson(rng, rate_per_s, 0, duration_s):
        n_in = min(2048, max(4, int(rng.lognormvariate(math.log(180), 1.0))))
        n_out = min(2048, max(4, int(rng.lognormvariate(math.log(220), 0.9))))
        reqs.append(Request(rng.choices(names, shares)[0], t, n_in, n_out))
    return reqs


WORKLOADS: dict[str, Callable[..., list[Request]]] = {
    "overload": overload,
    "proportional": proportional,
    "on-off": on_off,
    "poisson-short-long": poisson_short_long,
    "increasing": increasing,
    "distribution-shift": distribution_shift,
    "sharegpt-like": sharegpt_like,
}


def make_workload(name: str, duration_s: float = 600, seed: int = 0) -> list[Request]:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {sorted(WORKLOADS)}")
    return WORKLOADS[name](duration_s=duration_s, seed=seed)


def _zipf_shares(n: int, s: float = 1.0) -> list[float]:
    raw = [1 / (k + 1) ** s for k in range(n)]
    return [r / sum(raw) for r in raw]


# --- real trace formats ----------------------------------------------------------------------------------------------


def load_azure_csv(path: str | Path, clients: int = 16, seed: int = 0) -> list[Request]:
    """Azure LLM inference trace (`TIMESTAMP,ContextTokens,GeneratedTokens`). It has no tenants, so each request is
    given one of `clients` clients drawn with Zipf(1) shares by a `seed`ed generator: deterministic, and skewed the
    way VTC's synthetic tenants are."""
    path = Path(path)
    rng = random.Random(seed)
    shares = _zipf_shares(clients)
    names = [f"tenant-{i}" for i in range(clients)]
    rows = []
    with _open(path) as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise TraceFormatError(f"{path}: expected a CSV header with {sorted(need)}, got {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                ts = datetime.fromisoformat(row["TIMESTAMP"][:26])
                n_in, n_out = int(row["ContextTokens"]), int(row["GeneratedTokens"])
            except (TypeError, ValueError) as e:
                raise TraceFormatError(f"{path}:{line}: bad row {row}: {e}") from e
            rows.append((ts, n_in, n_out))
    if not rows:
        raise TraceFormatError(f"{path}: no requests")
    t0 = min(r[0] for r in rows)
    return [
        Request(rng.choices(names, shares)[0], (ts - t0).total_seconds(), max(1, n_in), max(1, n_out))
        for ts, n_in, n_out in rows
    ]


def load_jsonl(path: str | Path, rate_per_s: float = 2.0, seed: int = 0) -> list[Request]:
    """JSON-lines traces, one request per line, in either of two public forms:

    - VTC's arena trace: {"client", "arrival_s", "input_tokens", "output_tokens"};
    - LMSYS-Chat-1M: {"model", "conversation": [{"role", "content"}, ...]}: the client is the model (as in VTC's
      evaluation), input is the first user turn and output the first assistant turn (tokens estimated from text),
      arrivals are Poisson at `rate_per_s` (the data set has no times).
    """
    path = Path(path)
    rng = random.Random(seed)
    reqs, t = [], 0.0
    with _open(path) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if "input_tokens" in rec:
                    reqs.append(
                        Request(
                            str(rec["client"]),
                            float(rec["arrival_s"]),
                            int(rec["input_tokens"]),
                            int(rec["output_tokens"]),
                        )
                    )
                elif "conversation" in rec:
                    turns = rec["conversation"]
                    user = next(x["content"] for x in turns if x["role"] == "user")
                    answer = next(x["content"] for x in turns if x["role"] == "assistant")
                    t += rng.expovariate(rate_per_s)
                    reqs.append(Request(str(rec["model"]), t, estimate_tokens(user), estimate_tokens(answer)))
                else:
                    raise KeyError("neither input_tokens nor conversation")
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, StopIteration) as e:
                raise TraceFormatError(f"{path}:{line_no}: not a request record ({type(e).__name__}: {e})") from e
    if not reqs:
        raise TraceFormatError(f"{path}: no requests")
    return reqs


def load_sharegpt(path: str | Path, rate_per_s: float = 2.0, clients: int = 8, seed: int = 0) -> list[Request]:
    """ShareGPT JSON: a list of {"conversations": [{"from": "human"|"gpt", "value"}, ...]}. Each human turn followed
    by a gpt turn is a request (tokens estimated from text); Poisson arrivals at `rate_per_s`, clients with Zipf(1)
    shares (the data set has neither)."""
    path = Path(path)
    rng = random.Random(seed)
    try:
        with _open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise TraceFormatError(f"{path}: not JSON ({e})") from e
    if not isinstance(data, list):
        raise TraceFormatError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    shares, names = _zipf_shares(clients), [f"client-{i}" for i in range(clients)]
    reqs, t = [], 0.0
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise TraceFormatError(f"{path}: conversation {i} has no 'conversations' list")
        for a, b in zip(turns, turns[1:]):  # noqa: B905 (pairs of neighbours)
            try:
                if a["from"] == "human" and b["from"] == "gpt":
                    t += rng.expovariate(rate_per_s)
                    client = rng.choices(names, shares)[0]
                    reqs.append(Request(client, t, estimate_tokens(a["value"]), estimate_tokens(b["value"])))
            except (KeyError, TypeError) as e:
                raise TraceFormatError(f"{path}: conversation {i} has a malformed turn ({e})") from e
    if not reqs:
        raise TraceFormatError(f"{path}: no human/gpt turn pairs")
    return reqs


def load_trace(path: str | Path) -> list[Request]:
    """A trace file by its extension: .csv is the Azure trace, .jsonl VTC / LMSYS-Chat lines, .json ShareGPT."""
    path = Path(path)
    loaders = {".csv": load_azure_csv, ".jsonl": load_jsonl, ".json": load_sharegpt}
    if path.suffix not in loaders:
        raise TraceFormatError(
            f"{path}: unknown trace type {path.suffix!r}; use a .csv (Azure), .jsonl (VTC/LMSYS) or .json (ShareGPT)"
        )
    return loaders[path.suffix](path)


def bundled_trace(name: str) -> Path:
    """A real trace shipped with the package (`fairness/traces/`, licences in its README)."""
    path = Path(str(resources.files("fairness") / "traces" / name))
    if not path.is_file():
        raise FileNotFoundError(f"no bundled trace {name!r}; the package ships {sorted(BUNDLED_TRACES)}")
    return path


BUNDLED_TRACES = ("azure-llm-2023-conv.csv", "lmsys-arena-vtc.jsonl")


def _open(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"trace file {path} does not exist")
    return path.open(encoding="utf-8", newline="")
