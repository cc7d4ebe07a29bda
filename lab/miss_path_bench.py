"""Which miss path wins at which link speed: `fetch`, `host`, `auto` and FreeToken's split side by side, on an EMULATED
link at which one expert's copy takes 0.5x, 1x, 2x and 4x what the host takes to compute it (a real host: this
machine's CPU, the device's twin). At 0.5x copying should win, at 4x computing on the host; `auto` should match the
better of the two everywhere, also when its patch-time measurement of the host ran on a loaded CPU.

    python -m lab.miss_path_bench [--mode tiny|quick|default] [--shape qwen3-30b-a3b] [--ratios 0.5,1,2,4]
                                  [--out bench-results]

The model has a real model's routing shape and spread routing (`tests.scale_models`), at a quarter of its experts'
bytes, so most expert uses are misses. A host job's time per expert is measured first, by decoding with
`miss_path="host"`; each speed's rows are then patched on copies of the model at once and decode the same prompt in
alternating rounds, so machine drift hits them alike. Writes bench-results/miss_path.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lab import offload_bench as ob
from lab.freetoken_split import FreeTokenSplit
from lab.scale_bench import PROMPT, greedy
from offload_moe.blocks import moe_blocks
from offload_moe.patch import patch
from tests.emulation import EmulatedLink, emulated
from tests.scale_models import SHAPES, VOCAB, scale_model

COPY_OVER_HOST = (0.5, 1.0, 2.0, 4.0)  # one expert's copy over the link / one expert's host job, per sweep point
ROWS = {  # name: patch options, whether patch (its host measurement) runs on a loaded CPU
    "fetch": ({"miss_path": "fetch"}, False),
    "host": ({"miss_path": "host"}, False),
    "auto": ({"miss_path": "auto"}, False),
    "freetoken": ({"miss_path": FreeTokenSplit}, False),
    "auto (measured loaded)": ({"miss_path": "auto"}, True),
}
MODES = {"tiny": (1, 3), "quick": (2, 6), "default": (3, 10)}  # alternating rounds, greedy tokens per round
BUDGET = 0.25
GOAL = 0.95  # auto over the better of host and fetch


def host_seconds_per_expert(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    """Host worker seconds per missed expert at decode, `miss_path="host"` (no emulation)."""
    handle = patch(model, BUDGET, "cpu", miss_path="host")
    try:
        greedy(model, prompt, 4)  # warm-up
        greedy(model, prompt, tokens, handle)
        s = handle.stats()
    finally:
        handle.unpatch()
    return s.host_seconds / max(1, s.host_experts)


def sweep_point(models: dict, resident, prompt, ref: list[int], link: EmulatedLink, rounds: int, tokens: int) -> list:
    """Every row at one link speed, patched at once and decoded in alternating rounds with the resident model."""
    handles = {}
    try:
        for name, (options, loaded) in ROWS.items():
            with ob.loaded_cpu() if loaded else contextlib.nullcontext():
                handles[name] = patch(models[name], BUDGET, "cpu", options=emulated(link), **options)
            greedy(models[name], prompt, 4)  # warm-up
        speeds = {name: [] for name in [*ROWS, "resident"]}
        same = dict.fromkeys(ROWS, True)
        order = [*ROWS, "resident"]
        stats = {}
        for r in range(rounds):
            for name in order[r % len(order) :] + order[: r % len(order)]:
                h = handles.get(name)
                got, _, speed = greedy(resident if h is None else models[name], prompt, tokens, h)
                speeds[name].append(speed)
                if h is not None:
                    same[name] &= got == ref[:tokens]
                    stats[name] = h.stats()  # the last round's decode
    finally:
        for h in handles.values():
            h.unpatch()
    res = statistics.median(speeds["resident"])
    rows = []
    for name in ROWS:
        s, n = stats[name], tokens - 1
        rows.append(
            {
                "name": name,
                "miss_path": s.miss_path,
                "decode_tokens_per_s": statistics.median(speeds[name]),
                "x_resident": statistics.median(speeds[name]) / res,
                "greedy_identical": same[name],
                "hit_rate": s.hit_rate,
                "misses_per_token": s.misses / n,
                "host_per_token": s.host_experts / n,
                "copies_per_token": s.copies / n,
                "explored_per_token": s.explored / n,
                "stall_seconds_per_token": s.stall_seconds / n,
            }
        )
    best = max(r["decode_tokens_per_s"] for r in rows if r["name"] in ("host", "fetch"))
    for r in rows:
        r["x_best_of_host_and_fetch"] = r["decode_tokens_per_s"] / best
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=list(MODES), default="default")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--ratios", default=",".join(f"{r:g}" for r in COPY_OVER_HOST), help="copy / host job, each")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    rounds, tokens = MODES[args.mode]
    t0 = time.time()
    resident = scale_model(args.shape, spread=True)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    ref, _, _ = greedy(resident, prompt, tokens)
    blocks = moe_blocks(resident)
    experts = [getattr(b.experts, n) for b in blocks for n in b.expert_param_names()]
    expert_bytes = sum(p.numel() * p.element_size() for p in experts) // (len(blocks) * blocks[0].num_experts)
    models = {name: copy.deepcopy(resident) for name in ROWS}
    host_s = host_seconds_per_expert(models["host"], prompt, tokens)
    points = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        link = EmulatedLink(gbps=expert_bytes / (ratio * host_s) / 1e9)
        rows = sweep_point(models, resident, prompt, ref, link, rounds, tokens)
        points.append({"copy_over_host": ratio, "emulated_link_gbps": link.gbps, "rows": rows})
        print_point(points[-1])
    b = blocks[0]
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "mode": args.mode,
        "shape": args.shape,
        "moe_layers": len(blocks),
        "experts": b.num_experts,
        "top_k": b.top_k,
        "budget": BUDGET,
        "routing": "spread",
        "expert_bytes": expert_bytes,
        "host_seconds_per_expert": host_s,
        "rounds": rounds,
        "decode_tokens": tokens,
        "link": "EMULATED",
        "goal_auto_x_best": GOAL,
        "points": points,
        "seconds": time.time() - t0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "miss_path.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'miss_path.json'} ({result['seconds']:.0f} s)")


def print_point(p: dict) -> None:
    print(f"\ncopy = {p['copy_over_host']}x a host job (EMULATED link, {p['emulated_link_gbps']:.3f} GB/s)")
    print(f"{'row':<24}{'tok/s':>7}{'x res':>7}{'x best':>8}{'same':>6}{'hits':>6}{'host/tok':>9}{'copy/tok':>9}")
    for r in p["rows"]:
        print(
            f"{r['name']:<24}{r['decode_tokens_per_s']:>7.1f}{r['x_resident']:>7.2f}"
            f"{r['x_best_of_host_and_fetch']:>8.2f}{'yes' if r['greedy_identical'] else 'NO':>6}{r['hit_rate']:>6.2f}"
            f"{r['host_per_token']:>9.1f}{r['copies_per_token']:>9.1f}"
        )


if __name__ == "__main__":
    main()
