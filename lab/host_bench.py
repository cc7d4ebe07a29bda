"""Host compute against the memory's speed: how fast the host path reads expert weights, beside what this machine's
memory reads, for Mixtral-8x7B-sized (hidden 4096, intermediate 14336) and Qwen3-30B-A3B-sized (2048, 768) experts.

    python -m lab.host_bench [--mode tiny|quick|default] [--sizes mixtral-8x7b qwen3-30b-a3b] [--out bench-results]

The memory probe sums a 1 GiB tensor with the host path's own threads (the fastest of 9 reads: the ceiling). The host
path computes one expert per job for 1, 4 and 16 tokens through `HostCompute` (the path `miss_path="host"` takes),
cycling over enough distinct experts (random bf16 weights) that none is in a cache when read; its bandwidth is the
expert's bytes over the job's time. Beside it: three plain `F.linear` calls on the same weights (the most plain torch
gets from them: the host path's goal is to add nothing to it), the stock experts kernel on a one-expert twin (the host
path before the direct kernel), and the low-bit host experts (`host_precision`, LOSSY up to the measured number of
tokens per expert at which they beat the native weights), whose bandwidth counts their own (packed) bytes. REAL CPU and
memory, nothing emulated. The paths take turns call by call, so a shared machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.host import HostCompute, physical_cores
from offload_moe.runtime.kernels import expert_forward, one_expert_twin
from offload_moe.runtime.store import HostStore

SIZES = {"mixtral-8x7b": (4096, 14336), "qwen3-30b-a3b": (2048, 768)}  # hidden, expert intermediate
TOKENS = (1, 4, 16)
WORKING_SET = {"tiny": 1 << 26, "quick": 1 << 28, "default": 1 << 30}  # distinct experts cycled through: past caches
PRECISIONS = (None, "int8", "int4")
SECONDS = {"tiny": 0.0, "quick": 2.0, "default": 5.0}  # each token count's least time: small experts take more rounds
REPEATS = {"tiny": 3, "quick": 5, "default": 9}  # the least rounds
MAX_ROUNDS = 200


def memory_gbps(threads: int, repeats: int = 9) -> float:
    """Read bandwidth: summing a 1 GiB float32 tensor with `threads` torch threads, the fastest of `repeats` (the
    ceiling is what the memory can do; a shared VM's neighbours only ever slow a read down)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.ones(1 << 28)
    a.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    torch.set_num_threads(before)
    return a.numel() * 4 / min(times) / 1e9


def experts_of(hidden: int, intermediate: int, count: int) -> tuple[torch.nn.Module, HostStore]:
    """A Qwen3-MoE experts module of `count` random bf16 experts and its host store."""
    cfg = Qwen3MoeConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=count,
                         num_experts_per_tok=1)  # fmt: skip
    cfg._experts_implementation = "grouped_mm"
    with torch.device("meta"):
        module = Qwen3MoeExperts(cfg)
    gen = torch.Generator().manual_seed(0)
    weights = {n: (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16) for n, p in
               module.named_parameters()}  # fmt: skip
    for n, t in weights.items():
        setattr(module, n, torch.nn.Parameter(t, requires_grad=False))
    return module, HostStore.from_fused([weights])


def time_paths(paths: dict[str, Callable[[int], None]], count: int, repeats: int, seconds: float) -> dict[str, float]:
    """Median seconds of each path's `run(expert)` over rounds in which the paths take turns call by call (a shared
    machine's drift hits them alike), each call on the next of `count` distinct experts (none in a cache when read):
    at least `repeats` rounds, more (up to MAX_ROUNDS) until `seconds` have passed; one warm-up call each first."""
    for run in paths.values():
        run(0)
    times: dict[str, list[float]] = {n: [] for n in paths}
    e, start, rounds = 0, time.perf_counter(), 0
    while rounds < repeats or (time.perf_counter() - start < seconds and rounds < MAX_ROUNDS):
        for n, run in paths.items():
            e = 1 + e % (count - 1)
            t0 = time.perf_counter()
            run(e)
            times[n].append(time.perf_counter() - t0)
        rounds += 1
    return {n: statistics.median(t) for n, t in times.items()}


@torch.no_grad()  # as in generation, where the host path runs
def measure(name: str, repeats: int, working_set: int, least_seconds: float) -> dict:
    hidden, inter = SIZES[name]
    one = 3 * hidden * inter * 2  # bf16 bytes of one expert
    count = max(2, working_set // one + 1)
    module, store = experts_of(hidden, inter, count)
    hosts = {p: HostCompute(store, [module], store.names, hidden, torch.device("cpu"), Counters(1), precision=p)
             for p in PRECISIONS}  # fmt: skip
    twin = one_expert_twin(module)
    rows: dict[str, list[dict]] = {}
    for tokens in TOKENS:
        x = torch.randn(tokens, hidden).to(torch.bfloat16)
        w = torch.ones(tokens, 1)
        # each expert's routing, built before the timing as the hook gets it from the router
        ids = [np.full((tokens, 1), e, dtype=np.int64) for e in range(count)]
        paths, nbytes = {}, {}
        for precision, host in hosts.items():
            path = "host" if precision is None else f"host {precision} (LOSSY to {host.lowbit_tokens} tokens)"
            paths[path] = functools.partial(_host_job, host, x, w, ids)
            nbytes[path] = host.host_bytes(0, 0, tokens)  # the bytes this call reads

        def raw(e: int, x=x) -> None:  # the ceiling of plain torch: the expert's three matrices, one F.linear each
            t = store.expert_tensors(0, e)
            gate, up = t["gate_up_proj"].chunk(2)
            F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), t["down_proj"])

        def stock(e: int, x=x, w=w[:, 0]) -> None:
            expert_forward(twin, store.names, store.expert_tensors(0, e), x.float(), w)

        paths["three F.linear (raw matmuls)"], paths["stock kernel on a one-expert twin"] = raw, stock
        for path, seconds in time_paths(paths, count, repeats, least_seconds).items():
            b = nbytes.get(path, one)
            rows.setdefault(path, []).append({"path": path, "tokens": tokens, "seconds": seconds, "bytes": b,
                                              "gbps": b / seconds / 1e9})  # fmt: skip
    for host in hosts.values():
        host.shutdown()
    return {"experts": name, "hidden": hidden, "intermediate": inter, "expert_bytes": one, "distinct": count,
            "rows": [r for path_rows in rows.values() for r in path_rows]}  # fmt: skip


def _host_job(host: HostCompute, x: torch.Tensor, w: torch.Tensor, ids: list[np.ndarray], e: int) -> None:
    """One job of `host` for expert `e` on every token of x (the path `miss_path="host"` takes)."""
    host.result(host.submit(0, [e], x, w, ids[e], pairs=False, out_dtype=torch.float32))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=list(REPEATS), default="default")
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()  # a CPU device's host path computes on the calling thread
    result = {"machine": f"{platform.machine()}, {len(physical_cores())} physical cores, torch {torch.__version__}",
              "threads": threads, "memory_gbps": memory_gbps(threads),
              "sizes": [measure(name, REPEATS[args.mode], WORKING_SET[args.mode], SECONDS[args.mode])
                        for name in args.sizes]}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "host.json").write_text(json.dumps(result, indent=1))
    print(f"memory read bandwidth ({threads} threads): {result['memory_gbps']:.1f} GB/s")
    for m in result["sizes"]:
        print(f"{m['experts']}-sized experts ({m['expert_bytes'] / 1e6:.1f} MB bf16, {m['distinct']} distinct):")
        for r in m["rows"]:
            print(f"  {r['path']:<40} {r['tokens']:>3} tokens: {r['seconds'] * 1e3:8.2f} ms  {r['gbps']:5.1f} GB/s "
                  f"({r['gbps'] / result['memory_gbps']:.2f}x memory)")  # fmt: skip
    print(f"wrote {args.out / 'host.json'}")


if __name__ == "__main__":
    main()
