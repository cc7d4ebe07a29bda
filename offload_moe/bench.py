"""The offloading part of `make bench`: decode and prefill speed of the reference model with its experts offloaded,
side by side with the fully resident model, under one (emulated, on CPU) host-to-device link.

    python -m offload_moe.bench [--mode quick|default|full] [--model PATH] [--link-gbps G] [--out bench-results]
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

from .blocks import moe_blocks
from .calibrate import calibrate
from .evaluate import bits_per_byte
from .host import EmulatedHost
from .patch import patch, resolve_device
from .plots import plot_offload
from .reference import REFERENCE_MODEL, model_dir, stdlib_text
from .transfer import EmulatedLink

COPY_TO_LAYER_RATIO = 15.0  # Mixtral-8x7B on PCIe 4.0: one expert copy takes ~15x one layer's decode compute
HOST_TO_LINK_BANDWIDTH = 2.6  # dual-channel DDR5 (~65 GB/s) over PCIe 4.0 x16 (~25 GB/s)
CROSSOVER_TOKENS = 40  # computing an expert on the host costs as much as copying it at ~40 tokens (Fiddler's model)


@dataclass(frozen=True)
class Config:
    name: str
    budget: float | None  # None: the unpatched model, every expert resident
    prefetch: str | None = None
    fallback: str = "fetch"
    standin: str | None = None

    @property
    def eviction(self) -> str:
        return "layer" if self.name == "layer-aware" else "lru"


@dataclass(frozen=True)
class Mode:
    """How much `make bench` measures: budgets, which configurations, and how much text each decodes."""

    budgets: tuple[float, ...]
    layer_aware: bool  # include the layer-aware eviction ablation
    prompts: int
    eval_bytes: int


MODES = {
    "quick": Mode((0.25,), False, 2, 600),  # tests and bench-quick
    "default": Mode((0.25, 0.5), False, 3, 800),  # make bench: under 10 minutes with the fairness part
    "full": Mode((0.125, 0.25, 0.5), True, 4, 1200),  # make bench-full
}


def configs(mode: Mode, naive_budget: float) -> list[Config]:
    out = [Config("resident", None), Config("patched-1.0", 1.0), Config("naive", naive_budget)]
    for b in mode.budgets:
        out += [Config("lru", b)] + ([Config("layer-aware", b)] if mode.layer_aware else [])
        out += [Config("lookahead", b, "lookahead")]
        out += [Config(f"lookahead+{f}", b, "lookahead", standin=f) for f in ("drop", "buddy", "lowrank")]
        out += [Config("host", b, None, "host"), Config("auto", b, None, "auto")]
        out += [Config("auto+lookahead", b, "lookahead", "auto")]
    return out


@torch.no_grad()
def prefill_speed(model, prompts: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for ids in prompts:
        model(input_ids=ids, cache=DynamicCache(), use_cache=True)
    return sum(p.numel() for p in prompts) / (time.perf_counter() - t0)


def decode_speed_and_bpb(model, tokenizer, text: str) -> tuple[float, float, int]:
    """Teacher-forced decoding of `text`, one token at a time: (tokens/s, bits per byte, tokens decoded)."""
    n = len(tokenizer(text)["input_ids"])
    t0 = time.perf_counter()
    bpb = bits_per_byte(model, tokenizer, text, decode=True)
    return n / (time.perf_counter() - t0), bpb, n


def calibrate_link(model, tokenizer, text: str, expert_bytes: int) -> tuple[float, float]:
    """Link speed at which copying one expert takes COPY_TO_LAYER_RATIO x one layer's decode compute."""
    speed, _, _ = decode_speed_and_bpb(model, tokenizer, text)
    layer_s = 1.0 / speed / len(moe_blocks(model))
    return expert_bytes / (COPY_TO_LAYER_RATIO * layer_s) / 1e9, layer_s


def emulated_host(link: EmulatedLink, expert_bytes: int, expert_params: int) -> EmulatedHost:
    """A host with HOST_TO_LINK_BANDWIDTH x the link's bandwidth whose compute equals one copy at CROSSOVER_TOKENS."""
    copy_s = link.seconds(expert_bytes)
    return EmulatedHost(
        gbps=HOST_TO_LINK_BANDWIDTH * link.gbps, gflops=2 * expert_params * CROSSOVER_TOKENS / copy_s / 1e9
    )


def run_offload(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(stdlib_text("val", max_bytes=args.prompts * 4000), return_tensors="pt")["input_ids"][0]
    prompts = [ids[i * args.prompt_len : (i + 1) * args.prompt_len][None].to(device) for i in range(args.prompts)]
    eval_text = stdlib_text("val", max_bytes=args.eval_bytes)
    blocks = moe_blocks(model)
    experts = [getattr(b.experts, n) for b in blocks for n in b.expert_param_names()]
    all_expert_bytes = sum(p.numel() * p.element_size() for p in experts)
    expert_bytes = all_expert_bytes // (len(blocks) * blocks[0].num_experts)
    expert_params = sum(p.numel() for p in experts) // (len(blocks) * blocks[0].num_experts)
    calibration = args.out / "calibration.safetensors"
    calibrate(model, [stdlib_text("train", max_bytes=120_000)], tokenizer, path=calibration)  # train split only
    emulated = device.type == "cpu"
    layer_s = None
    if emulated:
        gbps = args.link_gbps
        if gbps is None:
            gbps, layer_s = calibrate_link(model, tokenizer, eval_text[: len(eval_text) // 4], expert_bytes)
        link = EmulatedLink(gbps=gbps)
        host = emulated_host(link, expert_bytes, expert_params)
    else:
        link, gbps, host = None, None, None
    naive_budget = max(b.top_k for b in blocks) / (len(blocks) * blocks[0].num_experts)
    runs = []
    for cfg in tqdm(configs(MODES[args.mode], naive_budget), desc="offload configs", unit="cfg"):
        handle = None
        if cfg.budget is not None:
            handle = patch(model, budget=cfg.budget, device=device, fallback=cfg.fallback, standin=cfg.standin,
                           prefetch=cfg.prefetch, eviction=cfg.eviction, link=link, host=host,
                           calibration=calibration if cfg.standin is not None else None)  # fmt: skip
        prefill = prefill_speed(model, prompts)
        if handle:
            handle.reset_stats()
        decode, bpb, tokens = decode_speed_and_bpb(model, tokenizer, eval_text)
        stats = handle.stats() if handle else None
        runs.append(
            {
                "name": cfg.name,
                "budget": cfg.budget if cfg.budget is not None else 1.0,
                "prefetch": cfg.prefetch,
                "fallback": cfg.fallback if cfg.budget is not None else None,
                "standin": cfg.standin,
                "eviction": cfg.eviction if cfg.budget is not None else None,
                "decode_tokens_per_s": decode,
                "prefill_tokens_per_s": prefill,
                "hit_rate": stats.hit_rate if stats else 1.0,
                "prefetch_precision": stats.prefetch_precision if stats and cfg.prefetch else None,
                "misses_per_token": stats.misses / tokens if stats else 0.0,
                "substituted_per_token": stats.substituted / tokens if stats else 0.0,
                "bytes_per_token": stats.bytes_copied / tokens if stats else 0.0,
                "stall_seconds": stats.stall_seconds if stats else 0.0,
                "host_per_token": stats.host_jobs / tokens if stats else 0.0,
                "host_wait_seconds": stats.host_wait_seconds if stats else 0.0,
                "copies_per_token": stats.copies / tokens if stats else 0.0,
                "bits_per_byte": bpb,
                "peak_device_bytes": stats.resident_bytes if stats else all_expert_bytes,
                "slots": stats.slots if stats else None,
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
        "host": ({"emulated": True, "gbps": host.gbps, "gflops": host.gflops,
                  "host_to_link_bandwidth": HOST_TO_LINK_BANDWIDTH, "crossover_tokens": CROSSOVER_TOKENS}
                 if host is not None else {"emulated": False, "cpu": platform.processor()}),
        "expert_bytes": expert_bytes,
        "decode": "teacher-forced, one token at a time through the KV cache, over the held-out text below",
        "eval_bytes": len(eval_text.encode()),
        "eval_tokens": len(tokenizer(eval_text)["input_ids"]),
        "prompts": args.prompts,
        "prompt_tokens": args.prompt_len,
        "runs": runs,
    }  # fmt: skip


def print_table(result: dict) -> None:
    link = result["link"]
    host = result["host"]
    where = (f"EMULATED link {link['gbps']:.4f} GB/s (one expert copy = {link['copy_to_layer_ratio']:.0f}x a layer's "
             f"decode compute) and EMULATED host {host['gbps']:.4f} GB/s ({host['host_to_link_bandwidth']}x the link; "
             f"computing an expert costs one copy at {host['crossover_tokens']} tokens)"
             if link["emulated"] else "real host-to-device link and host, nothing emulated")  # fmt: skip
    print(f"\noffload benchmark on {result['device']} ({result['machine']}), {where}")
    print(f"decode: {result['decode']} ({result['eval_tokens']} tokens)")
    runs = result["runs"]
    resident = runs[0]
    lru = {r["budget"]: r for r in runs if r["name"] == "lru"}
    head = (f"{'config':<18}{'budget':>7}{'slots':>6}{'decode/s':>9}{'x res':>7}{'x lru':>7}{'prefill/s':>10}"
            f"{'x lru':>7}{'hits':>7}{'miss/tok':>9}{'host/tok':>9}{'subs/tok':>9}{'KB/tok':>8}{'bits/B':>8}"
            f"{'d bits':>8}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in runs:
        base = lru.get(r["budget"])
        x_lru = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}" if base else "-"
        x_lru_prefill = f"{r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}" if base else "-"
        print(
            f"{r['name']:<18}{r['budget']:>7.3f}{r['slots'] or '-':>6}{r['decode_tokens_per_s']:>9.1f}"
            f"{r['decode_tokens_per_s'] / resident['decode_tokens_per_s']:>7.2f}{x_lru:>7}"
            f"{r['prefill_tokens_per_s']:>10.0f}{x_lru_prefill:>7}{r['hit_rate']:>7.3f}{r['misses_per_token']:>9.2f}"
            f"{r['host_per_token']:>9.2f}{r['substituted_per_token']:>9.2f}{r['bytes_per_token'] / 1024:>8.1f}"
            f"{r['bits_per_byte']:>8.4f}{(r['bits_per_byte'] / resident['bits_per_byte'] - 1) * 100:>7.2f}%"
        )
    print("hits: hit rate, the share of routed experts already resident or in flight when their layer ran; "
          "host/tok: experts computed on the host per token")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REFERENCE_MODEL, help="model directory (default: %(default)s)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--mode", choices=sorted(MODES), default="default", help="how much to measure")
    ap.add_argument("--link-gbps", type=float, default=None, help="emulated link speed (default: calibrated)")
    ap.add_argument("--prompts", type=int, default=None, help="prefill prompts (default: the mode's)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--eval-bytes", type=int, default=None, help="held-out text decoded per config (mode's)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    mode = MODES[args.mode]
    args.prompts = args.prompts or mode.prompts
    args.eval_bytes = args.eval_bytes or mode.eval_bytes
    try:
        model_dir(args.model)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from e
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_offload(args)
    (args.out / "offload.json").write_text(json.dumps(result, indent=1))
    print_table(result)
    pngs = plot_offload(result, args.out)
    print(f"wrote {args.out / 'offload.json'}, " + ", ".join(str(p) for p in pngs))


if __name__ == "__main__":
    main()
