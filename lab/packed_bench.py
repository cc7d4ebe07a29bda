"""Experts kept in their checkpoint's low-bit format against the same model dequantized to bf16, on an EMULATED link.

    python -m lab.packed_bench [--mode tiny|quick|default] [--out bench-results]

Each case writes a routing-scale model (`tests.scale_models`) as the hub ships it in a low-bit format (`tests.quantize`:
gpt-oss-120b's shape in MXFP4, Mixtral-8x7B's in FP8 and int4) and the same weights dequantized, saved plain in bf16.
Their token embeddings are scaled up so that routing follows the token as a trained model's does (`spread=True`).
Both are opened with `offload_moe.load` at the same budget fractions (the same number of experts resident) and
decode the same prompt with misses fetched over one EMULATED link: its speed is set so that one bf16 expert's copy
takes `COPY_TO_LAYER_RATIO` x one layer's decode compute of the bf16 model, the ratio of the real model on PCIe
(lab.offload_bench calibrates the Mixtral reference model the same way). Rows: bytes per copy, decode tokens/s and
its ratio to bf16 measured in the same round, each step's argmax against the bf16 model's (steps feed a fixed random
token stream), and the experts' bytes in RAM.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import DynamicCache

import offload_moe
from tests.emulation import EmulatedLink, emulated
from tests.quantize import save_quantized
from tests.scale_models import VOCAB, scale_model

CASES = [  # shape, format, group (int formats), one bf16 expert copy over one layer's decode compute
    ("gpt-oss-120b", "mxfp4", 0, 4.0),  # ~50 MB bf16 experts over PCIe 5.0, against a layer of an RTX 5090's decode
    ("mixtral-8x7b", "fp8", 0, 15.0),  # lab.offload_bench's Mixtral-8x7B on PCIe 4.0
    ("mixtral-8x7b", "int4", 64, 15.0),
]
BUDGETS = (0.25, 0.5)


class Mode(NamedTuple):
    rounds: int  # alternating rounds of bf16 and packed decoding
    tokens: int  # decode tokens per round
    budgets: tuple[float, ...]


# tiny: the test's, every path once at the goal's budget (each budget loads and decodes both checkpoints anew)
MODES = {"tiny": Mode(1, 3, BUDGETS[:1]), "quick": Mode(1, 6, BUDGETS), "default": Mode(3, 10, BUDGETS)}
GOAL = 2.5  # 4-bit formats at 1/4: decode >= 2.5x bf16 (FP8 moves half of bf16's bytes: its ceiling is 2x)


def decode(model, tokens: int, handle) -> tuple[list[int], float]:
    """Decode steps over a fixed random token stream (a random model's greedy output repeats one token, which would
    keep hitting the same experts): (each step's argmax, steps/s). The handle's counters start after the first."""
    stream = torch.randint(0, VOCAB, (1, tokens + 1), generator=torch.Generator().manual_seed(3))
    cache = DynamicCache()
    out = model(input_ids=stream[:, :1], cache=cache, use_cache=True)
    handle.reset_stats()
    got, t0 = [], time.perf_counter()
    for i in range(1, tokens + 1):
        got.append(int(out.logits[0, -1].argmax()))
        out = model(input_ids=stream[:, i : i + 1], cache=cache, use_cache=True)
    return got, tokens / (time.perf_counter() - t0)


def layer_seconds(path: Path, tokens: int) -> tuple[float, int]:
    """One MoE layer's share of the bf16 model's resident decode step, and one expert's bytes."""
    model, handle = offload_moe.load(path, budget=1.0, device="cpu")
    try:
        decode(model, 2, handle)
        speed = statistics.median(decode(model, tokens, handle)[1] for _ in range(2))
        s = handle.stats()
        return 1.0 / speed / len(s.per_layer), s.expert_bytes
    finally:
        handle.unpatch()


def run_case(shape: str, fmt: str, group: int, ratio: float, mode: str, root: Path) -> dict:
    rounds, tokens, budgets = MODES[mode]
    model = scale_model(shape, spread=True)
    packed_bytes = save_quantized(model, root / fmt, fmt, group=group or 128)
    model.save_pretrained(root / "bf16")  # the same weights, dequantized
    del model
    layer_s, bf16_expert = layer_seconds(root / "bf16", tokens)
    rows = []
    for budget in budgets:
        link = EmulatedLink(gbps=bf16_expert / (ratio * layer_s) / 1e9)
        opened = {}
        speeds: dict[str, list[float]] = {"bf16": [], fmt: []}
        stats, tokens_of = {}, {}
        for name in ("bf16", fmt):
            opened[name] = offload_moe.load(
                root / name, budget=budget, device="cpu", options=emulated(link), miss_path="fetch"
            )
            decode(opened[name][0], 2, opened[name][1])  # warm-up
        for r in range(rounds):
            for name in ("bf16", fmt) if r % 2 == 0 else (fmt, "bf16"):  # drift hits both alike
                got, speed = decode(opened[name][0], tokens, opened[name][1])
                speeds[name].append(speed)
                tokens_of[name] = got
                stats[name] = opened[name][1].stats()
        for _, handle in opened.values():
            handle.unpatch()
        s, b = stats[fmt], stats["bf16"]
        rows.append(
            {
                "budget": budget,
                "bytes_per_copy": s.bytes_copied / max(s.copies, 1),
                "bf16_bytes_per_copy": b.bytes_copied / max(b.copies, 1),
                "copy_bytes_x_bf16": (s.bytes_copied / max(s.copies, 1)) / (b.bytes_copied / max(b.copies, 1)),
                "decode_tokens_per_s": statistics.median(speeds[fmt]),
                "bf16_decode_tokens_per_s": statistics.median(speeds["bf16"]),
                "x_bf16": statistics.median(speeds[fmt]) / statistics.median(speeds["bf16"]),
                "greedy_identical": tokens_of[fmt] == tokens_of["bf16"],
                "misses_per_token": s.misses / tokens,
                "goal": GOAL if budget == 0.25 and fmt != "fp8" else None,
            }
        )
    experts = len(stats["bf16"].per_layer) * _experts_per_layer(root / fmt)
    return {
        "shape": shape,
        "format": fmt,
        "group": group or None,
        "expert_bytes": packed_bytes // experts,
        "bf16_expert_bytes": stats["bf16"].expert_bytes,
        "expert_bytes_x_bf16": packed_bytes / experts / stats["bf16"].expert_bytes,
        "ram_expert_bytes": packed_bytes,
        "bf16_ram_expert_bytes": stats["bf16"].expert_bytes * experts,
        "link": {"emulated": True, "gbps": link.gbps, "copy_to_layer_ratio": ratio, "layer_decode_s": layer_s},
        "rounds": rounds,
        "decode_tokens": tokens,
        "rows": rows,
    }


def _experts_per_layer(path: Path) -> int:
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("num_local_experts") or cfg["num_experts"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=sorted(MODES), default="default")
    p.add_argument("--out", default="bench-results")
    names = [f"{shape}:{fmt}" for shape, fmt, _, _ in CASES]
    p.add_argument("--cases", default=",".join(names), help=f"a subset of {','.join(names)}")
    args = p.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(names)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {', '.join(names)}")
    torch.manual_seed(0)
    results = []
    for shape, fmt, group, ratio in CASES:
        if f"{shape}:{fmt}" not in args.cases.split(","):
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = run_case(shape, fmt, group, ratio, args.mode, Path(tmp))
        r["seconds"] = time.perf_counter() - t0
        results.append(r)
        for row in r["rows"]:
            print(
                f"{shape} {fmt} budget {row['budget']}: {row['bytes_per_copy'] / 1e3:.1f} kB per copy "
                f"({row['copy_bytes_x_bf16']:.3f}x bf16), {row['decode_tokens_per_s']:.2f} tok/s = "
                f"{row['x_bf16']:.2f}x bf16 on the EMULATED link, greedy identical: {row['greedy_identical']}"
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "packed.json").write_text(json.dumps({"mode": args.mode, "vocab": VOCAB, "cases": results}, indent=2))
    print(f"wrote {out / 'packed.json'}")


if __name__ == "__main__":
    main()
