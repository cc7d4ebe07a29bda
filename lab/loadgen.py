"""`python -m lab.loadgen`: replay a trace or a workload against any OpenAI-compatible endpoint with the official
`openai` client (async), one client identity per trace client, and measure it as the simulator measures a run.

    python -m lab.loadgen --url http://127.0.0.1:8000 --workload overload --duration 60 --speedup 0.1

Each request is a streamed completion whose prompt is `input_tokens` token ids and whose `max_tokens` is the trace's
output length (with `ignore_eos`, which vLLM and fairness.serve honour, so lengths are replayed exactly). The client
is named by the `user` field, or by its API key (`--api-keys`). Requests are sent at their arrival times divided by
`--speedup`; sending stops after `--duration` seconds and the run after `--timeout` more.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from openai import AsyncOpenAI

from fairness.core.request import Request
from fairness.measure.records import RecordMetrics, RequestRecord, record_metrics
from fairness.sim.simulator import SimResult
from fairness.sim.workloads import WORKLOADS, TraceFormatError, load_trace, make_workload


def prompt_ids(n: int) -> list[int]:
    """n token ids valid in any vocabulary of at least 100 tokens."""
    return [3 + i % 97 for i in range(n)]


async def replay(
    base_url: str,
    model: str,
    requests: Sequence[Request],
    speedup: float = 1.0,
    duration_s: float | None = None,
    timeout_s: float = 600.0,
    api_keys: dict[str, str] | None = None,
    ignore_eos: bool = True,
    stop_at_s: float | None = None,
    tenant_xargs: bool = False,
) -> list[RequestRecord]:
    """Send every request (arrival <= duration) at arrival / speedup seconds; records on the replay's clock.
    stop_at_s: abandon what is still running at this time (the server cancels it), for a fixed measurement window.
    tenant_xargs: also name the client in `vllm_xargs` ({"tenant": ...}), where vLLM's fairness plug-in reads it."""
    if speedup <= 0:
        raise ValueError(f"speedup must be > 0, got {speedup}")
    todo = sorted((r for r in requests if duration_s is None or r.arrival_s / speedup <= duration_s),
                  key=lambda r: r.arrival_s)  # fmt: skip
    clients = {c: AsyncOpenAI(base_url=base_url.rstrip("/") + "/v1", api_key=(api_keys or {}).get(c, "loadgen"),
                              max_retries=0, timeout=timeout_s) for c in {r.client for r in todo}}  # fmt: skip
    t0 = time.monotonic()

    async def one(r: Request) -> RequestRecord:
        arrival = r.arrival_s / speedup
        await asyncio.sleep(max(0.0, t0 + arrival - time.monotonic()))
        seen: dict[str, float | int] = {"out": 0}

        extra = {"ignore_eos": ignore_eos, **({"vllm_xargs": {"tenant": r.client}} if tenant_xargs else {})}

        async def send() -> None:
            stream = await clients[r.client].completions.create(
                model=model, prompt=prompt_ids(r.input_tokens), max_tokens=r.output_tokens, stream=True,
                stream_options={"include_usage": True}, user=r.client, extra_body=extra,
            )  # fmt: skip
            async for chunk in stream:
                if chunk.choices and "first" not in seen:
                    seen["first"] = time.monotonic() - t0
                if chunk.usage is not None:
                    seen["out"] = chunk.usage.completion_tokens
            seen["finish"] = time.monotonic() - t0

        try:
            limit = timeout_s if stop_at_s is None else max(0.01, t0 + stop_at_s - time.monotonic())
            await asyncio.wait_for(send(), limit)
        except Exception:  # refused, failed or too slow: recorded as not finished
            seen.pop("finish", None)
        return RequestRecord(r.client, arrival, r.input_tokens, int(seen["out"]), seen.get("first"), seen.get("finish"),
                             r.weight)  # fmt: skip

    try:
        return list(await asyncio.gather(*(one(r) for r in todo)))
    finally:
        for c in clients.values():
            await c.close()


def as_result(label: str, m: RecordMetrics) -> SimResult:
    """A run measured from records, in the simulator's result type (for tables and plots)."""
    return SimResult(label, m.metrics, m.per_client, m.times, m.service, m.ttft)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Replay a trace or workload against an OpenAI-compatible endpoint.")
    ap.add_argument("--url", required=True, help="the server's base URL, e.g. http://127.0.0.1:8000")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--trace", type=Path, help="a trace file: .csv (Azure), .jsonl (VTC/LMSYS), .json (ShareGPT)")
    src.add_argument("--workload", choices=sorted(WORKLOADS))
    ap.add_argument("--model", default=None, help="model name (default: the server's first model)")
    ap.add_argument("--speedup", type=float, default=1.0, help="send at arrival / speedup (< 1 slows the trace)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of sending")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the last answers")
    ap.add_argument("--max-context", type=int, default=None, help="clip input + output to this many tokens")
    ap.add_argument("--api-keys", type=Path, help='JSON {"<client>": "<api key>"}: identify clients by key')
    ap.add_argument("--label", default="served")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    try:
        if args.trace:
            requests = load_trace(args.trace)
        else:
            requests = make_workload(args.workload, args.duration * args.speedup)
        keys = json.loads(args.api_keys.read_text()) if args.api_keys else None
    except (ValueError, FileNotFoundError, TraceFormatError) as e:
        raise SystemExit(str(e)) from e
    if args.max_context:
        requests = [clip(r, args.max_context) for r in requests]
    model = args.model or asyncio.run(_first_model(args.url))
    records = asyncio.run(replay(args.url, model, requests, args.speedup, args.duration, args.timeout, keys))
    measured = record_metrics(records)
    from lab.fairness_plots import plot_runs

    args.out.mkdir(parents=True, exist_ok=True)
    pngs = plot_runs([as_result(args.label, measured)], f"loadgen-{args.label}", args.out)
    path = args.out / f"loadgen-{args.label}.json"
    path.write_text(json.dumps({"metrics": measured.metrics, "per_client": measured.per_client,
                                "records": [r.as_dict() for r in records]}, indent=1, default=float))  # fmt: skip
    print(json.dumps(measured.metrics, indent=1, default=float))
    print("wrote", path, *pngs)


def clip(r: Request, context: int) -> Request:
    """The request shrunk to fit `context` tokens, input and output in proportion."""
    if r.input_tokens + r.output_tokens <= context:
        return r
    scale = context / (r.input_tokens + r.output_tokens)
    return Request(r.client, r.arrival_s, max(1, int(r.input_tokens * scale)), max(1, int(r.output_tokens * scale)),
                   r.max_output_tokens, r.weight)  # fmt: skip


async def _first_model(url: str) -> str:
    async with AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="loadgen", max_retries=0) as client:
        models = await client.models.list()
        return models.data[0].id


if __name__ == "__main__":
    main()
