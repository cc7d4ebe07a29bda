"""The offload runtime at the routing scale of the models people run (`tests.scale_models`, with spread routing: each
token's experts follow the token, as a trained model's do, so most expert uses at small budgets are misses):
resident and patched greedy decoding side by side, and the runtime alone replaying recorded routing traces.

    python -m lab.scale_bench [--mode tiny|quick|default|full] [--shapes qwen3-30b-a3b,...] [--out bench-results]

Each shape's resident model and a copy of it (patched, one configuration at a time) decode the same prompt in
alternating rounds, so machine drift hits both alike; a ratio is the median patched decode speed over the median
resident one of the same rounds. On the CPU device a copy is a plain memcpy (nothing emulated) unless the row says
EMULATED: those meet an emulated link calibrated as `lab.offload_bench` calibrates it (one expert copy = 15x a
layer's decode compute) and an emulated host. `--mode full` runs the EMULATED rows on every shape; the default mode
on the Mixtral-8x7B shape only (at 128-256 experts a prefill on that link takes tens of seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DynamicCache

from hooks import find_moe_blocks
from lab import offload_bench as ob
from lab.runtime_replay import replay_rows
from offload_moe.options import default_miss_path
from offload_moe.patch import patch
from tests.emulation import EmulatedLink, emulated
from tests.scale_models import SHAPES, VOCAB, scale_model

ROWS = [  # name, budget, patch options, emulated link and host
    ("patched-1.0", 1.0, {"miss_path": "fetch"}, False),
    ("fetch", 0.5, {"miss_path": "fetch"}, False),
    ("fetch", 0.25, {"miss_path": "fetch"}, False),
    ("host", 0.25, {"miss_path": "host"}, False),
    ("default (EMULATED link, host)", 0.25, {"miss_path": default_miss_path("cuda")}, True),  # a GPU's default
    ("fetch (EMULATED link)", 0.25, {"miss_path": "fetch"}, True),
]


class Mode(NamedTuple):
    rounds: int  # alternating rounds of resident and patched decoding
    tokens: int  # greedy tokens per round
    emulated_tokens: int  # ... of the EMULATED rows
    emulated_shapes: tuple[str, ...]  # the shapes with EMULATED rows
    replay_sizes: int  # pool sizes the runtime-alone replay runs
    emulated_rows: tuple[str, ...] | None = None  # which EMULATED rows (None: every one)


MODES = {
    # the test's: every code path, numbers too short to read; the fetch-only EMULATED row (a prefill at 15x a layer's
    # compute per copy, most of the mode's time) runs in the others
    "tiny": Mode(1, 4, 2, ("mixtral-8x7b",), 2, ("default (EMULATED link, host)",)),
    "quick": Mode(1, 6, 3, ("mixtral-8x7b",), 2),
    "default": Mode(1, 10, 4, ("mixtral-8x7b",), 3),  # emulated at 256 experts: ~20 s a prefill (make bench's time)
    "full": Mode(3, 24, 12, tuple(SHAPES), 5),
}
GOALS = {("patched-1.0", 1.0): 0.97, ("fetch", 0.5): 0.90, ("fetch", 0.25): 0.85, ("host", 0.25): 0.80}
PROMPT = 16  # tokens


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, tokens: int, handle=None) -> tuple[list[int], float, float]:
    """Greedy decoding of `tokens` new tokens: (tokens, prefill seconds, decode tokens/s). The handle's counters
    are reset after the prefill, so its stats are the decode's."""
    cache = DynamicCache()
    t0 = time.perf_counter()
    out = model(input_ids=prompt, cache=cache, use_cache=True)
    prefill = time.perf_counter() - t0
    if handle is not None:
        handle.reset_stats()
    nxt = out.logits[:, -1:].argmax(-1)
    got = [int(nxt)]
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        got.append(int(nxt))
    return got, prefill, (tokens - 1) / (time.perf_counter() - t0)


def run_shape(shape: str, mode: str, resident: torch.nn.Module) -> dict:
    """Every row of `mode` on the routing shape `shape` (its `resident` model), side by side with the resident."""
    m = MODES[mode]
    rounds, tokens, emulated_tokens = m.rounds, m.tokens, m.emulated_tokens
    patched = copy.deepcopy(resident)
    blocks = find_moe_blocks(resident)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ref, _, _ = greedy(resident, prompt, tokens)
    speeds = [greedy(resident, prompt, tokens)[2] for _ in range(2)]
    layer_s = 1.0 / statistics.median(speeds) / len(blocks)
    experts = [getattr(b.experts, n) for b in blocks for n in b.expert_param_names()]
    n_experts = len(blocks) * blocks[0].num_experts
    expert_bytes = sum(p.numel() * p.element_size() for p in experts) // n_experts
    expert_params = sum(p.numel() for p in experts) // n_experts
    link = EmulatedLink(gbps=expert_bytes / (ob.COPY_TO_LAYER_RATIO * layer_s) / 1e9)
    host = ob.emulated_host(link, expert_bytes, expert_params)
    rows = []
    for name, budget, options, on_link in ROWS:
        if on_link and (shape not in m.emulated_shapes or m.emulated_rows is not None and name not in m.emulated_rows):
            continue
        n = emulated_tokens if on_link else tokens
        paced = emulated(link, host, chunk_bytes=max(1, expert_bytes // ob.CHUNKS_PER_EXPERT)) if on_link else None
        handle = patch(patched, budget, "cpu", options=paced, **options)
        try:
            greedy(patched, prompt, 4)  # warm-up
            res, pat, same = [], [], True
            for i in range(rounds):
                pair = [(resident, None, res), (patched, handle, pat)]
                for model, h, out in pair if (i + len(rows)) % 2 == 0 else pair[::-1]:  # drift hits both alike
                    got, prefill, speed = greedy(model, prompt, n, h)
                    out.append((speed, prefill))
                    same &= h is None or got == ref[:n]
            s = handle.stats()
        finally:
            handle.unpatch()
        ratio = statistics.median(p for p, _ in pat) / statistics.median(r for r, _ in res)
        rows.append(
            {
                "name": name,
                "budget": budget,
                "emulated": on_link,
                "options": {k: str(v) for k, v in options.items()},
                "decode_tokens_per_s": statistics.median(p for p, _ in pat),
                "resident_tokens_per_s": statistics.median(r for r, _ in res),
                "x_resident": ratio,
                "prefill_x_resident": statistics.median(r for _, r in res) / statistics.median(p for _, p in pat),
                "greedy_identical": same,
                "hit_rate": s.hit_rate,
                "slots": s.slots,
                "decode_tokens": n,
                "misses_per_token": s.misses / (n - 1),
                "host_per_token": s.host_experts / (n - 1),
                "kernel_passes_per_call": s.kernel_passes / s.layer_calls if s.layer_calls else 1.0,
                "runtime_us_per_call": s.runtime_us_per_call,
                "runtime_us_per_miss": s.runtime_us_per_miss,
                "goal": GOALS.get((name, budget)),
            }
        )
    b = blocks[0]
    return {
        "shape": shape,
        "moe_layers": len(blocks),
        "experts": b.num_experts,
        "top_k": b.top_k,
        "hidden": resident.config.hidden_size,
        "expert_bytes": expert_bytes,
        "dtype": "bfloat16",
        "routing": "spread",
        "decode_tokens": tokens,
        "prompt_tokens": PROMPT,
        "rounds": rounds,
        "mode": mode,
        "link": {"emulated_gbps": link.gbps, "copy_to_layer_ratio": ob.COPY_TO_LAYER_RATIO},
        "rows": rows,
    }


def print_shape(m: dict) -> None:
    print(
        f"\n{m['shape']}: {m['moe_layers']} MoE layers x {m['experts']} experts, top-{m['top_k']}, hidden "
        f"{m['hidden']}, bf16, spread routing, CPU device; {m['decode_tokens']} greedy tokens after "
        f"{m['prompt_tokens']} "
        f"(EMULATED rows fewer), {m['rounds']} alternating rounds; copies are memcpy unless EMULATED"
    )
    head = (
        f"{'config':<32}{'budget':>7}{'tok/s':>7}{'x res':>7}{'goal':>6}{'same':>6}{'hits':>6}{'miss/tok':>9}"
        f"{'passes':>7}{'us/call':>8}{'us/miss':>8}{'prefill x':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in m["rows"]:
        goal = f"{r['goal']:.2f}" if r["goal"] else "-"
        print(
            f"{r['name']:<32}{r['budget']:>7.3f}{r['decode_tokens_per_s']:>7.1f}{r['x_resident']:>7.2f}{goal:>6}"
            f"{'yes' if r['greedy_identical'] else 'NO':>6}{r['hit_rate']:>6.2f}{r['misses_per_token']:>9.1f}"
            f"{r['kernel_passes_per_call']:>7.2f}{r['runtime_us_per_call']:>8.0f}{r['runtime_us_per_miss']:>8.0f}"
            f"{r['prefill_x_resident']:>10.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=list(MODES), default="default")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {sorted(SHAPES)}")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "mode": args.mode,
        "shapes": [],
    }
    models = {}
    for shape in shapes:
        models[shape] = scale_model(shape, spread=True)
        result["shapes"].append(run_shape(shape, args.mode, models[shape]))
        if shape != "deepseek-v3":
            del models[shape]
    result["replay"] = replay_rows(MODES[args.mode].replay_sizes, models.get("deepseek-v3"))
    result["seconds"] = time.time() - t0
    (args.out / "scale.json").write_text(json.dumps(result, indent=1))
    for m in result["shapes"]:
        print_shape(m)
    print("\nthe runtime alone, recorded DeepSeek-V3-shaped routing traces replayed through the hooks (no model):")
    for r in result["replay"]:
        print(
            f"  {r['routing']:>7} routing, {r['slots']:>6} slots ({r['sets']} sets): {r['us_per_call']:.0f} us per "
            f"layer call, {r['misses_per_call']:.1f} misses, {r['us_per_miss']:.0f} us per miss, hit rate "
            f"{r['hit_rate']:.2f}, {r['victim_steps_per_eviction']:.2f} keys examined per eviction"
        )
    print(f"wrote {args.out / 'scale.json'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
