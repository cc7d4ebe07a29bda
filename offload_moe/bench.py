"""`make bench`: decode and prefill speed of the reference model with its experts offloaded, side by side with the
fully resident model, under one (emulated, on CPU) host-to-device link; then the fairness simulations.

    python -m offload_moe.bench [--quick] [--model PATH] [--link-gbps G] [--out bench-results]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from hooks import find_moe_blocks

from .evaluate import bits_per_byte
from .patch import patch, resolve_device
from .reference import REFERENCE_MODEL_DIR, stdlib_text
from .transfer import EmulatedLink

COPY_TO_LAYER_RATIO = 15.0  # Mixtral-8x7B on PCIe 4.0: one expert copy takes ~15x one layer's decode compute


@dataclass(frozen=True)
class Config:
    name: str
    budget: float | None  # None: the unpatched model, every expert resident
    prefetch: str | None = None
    fallback: str = "fetch"


def configs(quick: bool) -> list[Config]:
    budgets = [0.25] if quick else [0.125, 0.25, 0.5]
    out = [Config("resident", None), Config("patched-1.0", 1.0)]
    out += [Config("lru", b) for b in budgets]
    return out


@torch.no_grad()
def decode_run(model, prompts: list[torch.Tensor], new_tokens: int) -> dict[str, float]:
    """Greedy decoding of each prompt (batch 1): prefill and decode timed separately."""
    prefill_s = decode_s = 0.0
    n_prefill = n_decode = 0
    for ids in prompts:
        cache = DynamicCache()
        t0 = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        prefill_s += time.perf_counter() - t0
        n_prefill += ids.numel()
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, cache=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        decode_s += time.perf_counter() - t0
        n_decode += new_tokens
    return {"prefill_tokens_per_s": n_prefill / prefill_s, "decode_tokens_per_s": n_decode / decode_s}


def calibrate_link(model, prompts: list[torch.Tensor], expert_bytes: int) -> tuple[float, float]:
    """Link speed at which copying one expert takes COPY_TO_LAYER_RATIO x one layer's decode compute."""
    speed = decode_run(model, prompts[:1], 16)["decode_tokens_per_s"]
    layer_s = 1.0 / speed / model.config.num_hidden_layers
    return expert_bytes / (COPY_TO_LAYER_RATIO * layer_s) / 1e9, layer_s


def run_offload(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = stdlib_text("val", max_bytes=args.prompts * 4000)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    prompts = [ids[i * args.prompt_len : (i + 1) * args.prompt_len][None].to(device) for i in range(args.prompts)]
    eval_text = stdlib_text("val", max_bytes=args.eval_bytes)
    blocks = find_moe_blocks(model)
    experts = [getattr(b.experts, n) for b in blocks for n in b.expert_param_names()]
    all_expert_bytes = sum(p.numel() * p.element_size() for p in experts)
    expert_bytes = all_expert_bytes // (len(blocks) * blocks[0].num_experts)
    emulated = device.type == "cpu"
    layer_s = None
    if emulated:
        gbps = args.link_gbps
        if gbps is None:
            gbps, layer_s = calibrate_link(model, prompts, expert_bytes)
        link = EmulatedLink(gbps=gbps)
    else:
        link, gbps = None, None
    runs = []
    for cfg in tqdm(configs(args.quick), desc="offload configs", unit="cfg"):
        handle = None
        if cfg.budget is not None:
            handle = patch(model, budget=cfg.budget, device=device, fallback=cfg.fallback, link=link)
            handle.reset_stats()
        speed = decode_run(model, prompts, args.new_tokens)
        stats = handle.stats() if handle else None
        bpb = bits_per_byte(model, tokenizer, eval_text) if cfg.name in ("resident", "lru") or not args.quick else None
        tokens = args.prompts * (args.prompt_len + args.new_tokens)
        runs.append(
            {
                "name": cfg.name,
                "budget": cfg.budget if cfg.budget is not None else 1.0,
                "prefetch": cfg.prefetch,
                "fallback": cfg.fallback if cfg.budget is not None else None,
                **speed,
                "hit_rate": stats["hit_rate"] if stats else 1.0,
                "prefetch_recall": None,
                "misses_per_token": stats["misses"] / tokens if stats else 0.0,
                "bytes_per_token": stats["bytes_copied"] / tokens if stats else 0.0,
                "stall_seconds": stats["stall_seconds"] if stats else 0.0,
                "bits_per_byte": bpb,
                "peak_device_bytes": stats["resident_bytes"] if stats else all_expert_bytes,
            }
        )
        if handle:
            handle.unpatch()
    return {
        "device": str(device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "model": str(args.model),
        "link": {"emulated": emulated, "gbps": gbps, "copy_to_layer_ratio": COPY_TO_LAYER_RATIO if emulated else None,
                 "layer_decode_seconds": layer_s},
        "expert_bytes": expert_bytes,
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_len,
        "new_tokens": args.new_tokens,
        "eval_bytes": args.eval_bytes,
        "runs": runs,
    }  # fmt: skip


def print_table(result: dict) -> None:
    link = result["link"]
    where = (f"EMULATED link {link['gbps']:.3f} GB/s (one expert copy = {link['copy_to_layer_ratio']:.0f}x a layer's "
             "decode compute)" if link["emulated"] else "real host-to-device link")  # fmt: skip
    print(f"\noffload benchmark on {result['device']} ({result['machine']}), {where}")
    resident = result["runs"][0]["decode_tokens_per_s"]
    head = f"{'config':<14}{'budget':>7}{'decode tok/s':>14}{'x resident':>11}{'prefill tok/s':>15}{'hit rate':>10}"
    head += f"{'miss/token':>11}{'KB/token':>10}{'bits/byte':>10}"
    print(head)
    print("-" * len(head))
    for r in result["runs"]:
        bpb = f"{r['bits_per_byte']:.4f}" if r["bits_per_byte"] is not None else "-"
        print(
            f"{r['name']:<14}{r['budget']:>7.3f}{r['decode_tokens_per_s']:>14.1f}"
            f"{r['decode_tokens_per_s'] / resident:>11.2f}{r['prefill_tokens_per_s']:>15.0f}{r['hit_rate']:>10.3f}"
            f"{r['misses_per_token']:>11.2f}{r['bytes_per_token'] / 1024:>10.1f}{bpb:>10}"
        )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REFERENCE_MODEL_DIR)
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="a subset, for quick checks")
    ap.add_argument("--link-gbps", type=float, default=None, help="emulated link speed (default: calibrated)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--eval-bytes", type=int, default=32_000)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--skip-fairness", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.new_tokens, args.eval_bytes = 2, 24, 8_000
    if not (args.model / "config.json").exists():
        raise SystemExit(f"{args.model} is not a model directory (no config.json)")
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_offload(args)
    (args.out / "offload.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    print(f"wrote {args.out / 'offload.json'}")
    if not args.skip_fairness:
        from fairness.bench import run_fairness_bench

        run_fairness_bench(args.out, quick=args.quick)


if __name__ == "__main__":
    main()
