"""The offloading part of `make bench`: decode and prefill speed and held-out bits per byte of the reference models
(Mixtral-shaped and fine-grained) with their experts offloaded, side by side with the fully resident model, under one
(emulated, on CPU) host-to-device link and host; plus each stand-in kind's own quality.

    python -m lab.offload_bench [--mode quick|default|full|cw-sweep] [--models mixtral,fine] [--out bench-results]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from lab.freetoken_split import FreeTokenSplit
from lab.offload_plots import plot_offload
from lab.offload_report import print_compiled, print_goals, print_quality, print_table
from lab.reference import REPO, model_dir
from lab.routing_stats import hit_rate_vs_budget, lookahead_recall
from lab.standin_quality import standin_quality
from offload_moe.blocks import moe_blocks
from offload_moe.calibration import calibrate
from offload_moe.options import default_miss_path
from offload_moe.patch import patch, resolve_device
from tests.corpus import corpus_text
from tests.emulation import EmulatedHost, EmulatedLink, emulated
from tests.measure import bits_per_byte, decode_logits

COPY_TO_LAYER_RATIO = 15.0  # Mixtral-8x7B on PCIe 4.0: one expert copy takes ~15x one layer's decode compute
HOST_TO_LINK_BANDWIDTH = 2.6  # dual-channel DDR5 (~65 GB/s) over PCIe 4.0 x16 (~25 GB/s)
CROSSOVER_TOKENS = 40  # computing an expert on the host costs as much as copying it at ~40 tokens (Fiddler's model)
MODELS = {"mixtral": REPO / "examples" / "reference-moe", "fine": REPO / "examples" / "reference-moe-fine"}
DTYPE = torch.bfloat16  # the dtype deployments use: every byte counted is a deployment byte


@dataclass(frozen=True)
class Config:
    name: str
    budget: float | None  # None: the unpatched model, every expert resident
    options: dict = field(default_factory=dict)  # patch() keywords besides the emulation and calibration
    compiled: bool = False  # compile=True (resident: torch.compile(model.forward)), static KV cache
    loaded: bool = False  # patch() (its host-cost measurement) runs while two busy processes load the CPU


LRU = {"miss_path": "fetch", "prefetch": None}
LOOKAHEAD = {"miss_path": "fetch", "prefetch": "lookahead"}
AUTO = {"miss_path": "auto", "prefetch": None}
AUTO_LOOKAHEAD = {"miss_path": "auto", "prefetch": "lookahead"}
STANDINS = {"drop": {"standin": "drop"}, "buddy": {"standin": "buddy"}, "lowrank": {"standin": "lowrank"},
            "quant2": {"standin": "quant", "bits": 2}, "lowbit4": {"standin": "lowbit", "bits": 4},
            "mixed": {"standin": "mixed", "standin_fraction": 0.15}}  # fmt: skip
CALIBRATED = ("buddy", "lowrank", "mixed")  # stand-in kinds and placements that read the calibration file
HIT_RATE_BUDGETS = (0.125, 0.25, 0.5, 0.75)
CHUNKS_PER_EXPERT = 8  # emulated copies move in eighths of an expert: demand waits at most 1/8 copy behind speculation

SHORT = {"resident", "patched-1.0", "default", "lru", "lookahead", "auto", "auto+lookahead", "static-frequency",
         "static-frequency+buddy", "lru+buddy", "auto+buddy", "auto+mixed"}  # fmt: skip
# make bench's rows; lru+buddy (13 s of a run at its 10-minute limit) is in quick and full mode, auto+buddy here
LEAN = SHORT - {"lru+buddy"} | {
    "static-layers",
    "host",
    "lru+drop",
    "auto+quant2",
    "auto+lowbit4",
}  # issue 32's rows (freetoken, host+int8, auto+int8, auto measured loaded) run in full mode: make bench's 10 minutes
# compiled twins outside full mode (where every row has one): the goals' rows, the default being the best lossless
# one; a lossy twin cost make bench ~15 s it does not have (10-minute limit)
COMPILED = {"resident", "patched-1.0", "default"}
RESIDENT_REPEATS = 5  # rows with every expert resident decode in well under a second: the median of 5 passes (default)
STATIC_LEN = 256  # compiled rows decode through a static KV cache of this many positions (the eval window)


def configs(mode: str, model: str, compiled: bool = True) -> list[Config]:
    """The configurations of a mode for one model, in table order: "full" runs every configuration at budgets 1/4
    and 1/2; "default" the LEAN list at 1/4; "quick" the SHORT list at 1/4; "cw-sweep" the critical_weight sweep of
    the quantised stand-ins at 1/4. Then (unless `compiled` is False) the compiled twins: of every row in "full", of
    COMPILED's rows otherwise."""
    if mode == "cw-sweep":
        out = [Config("resident", None), Config("auto", 0.25, AUTO)]
        for cw in (0.5, 0.7, 0.9, 1.01):
            out += [Config(f"auto+quant2 cw{cw}", 0.25, {**AUTO, "standin": "quant", "bits": 2, "critical_weight": cw}),
                    Config(f"auto+mixed cw{cw}", 0.25, {**AUTO, "standin": "mixed", "standin_fraction": 0.2,
                                                        "critical_weight": cw})]  # fmt: skip
        return out
    out = [Config("resident", None), Config("patched-1.0", 1.0)]
    for b in (0.25, 0.5) if mode == "full" else (0.25,):
        out += [Config("default", b)]  # patch(model, budget) with no options: what a user gets
        out += [Config("lru", b, LRU), Config("lookahead", b, LOOKAHEAD)]
        out += [Config("host", b, {"miss_path": "host", "prefetch": None}), Config("auto", b, AUTO),
                Config("auto+lookahead", b, AUTO_LOOKAHEAD)]  # fmt: skip
        out += [Config("auto (measured loaded)", b, AUTO, loaded=True),
                Config("freetoken", b, {"miss_path": FreeTokenSplit, "prefetch": None}),
                Config("host+int8", b, {"miss_path": "host", "prefetch": None, "host_precision": "int8"}),
                Config("auto+int8", b, {**AUTO, "host_precision": "int8"})]  # fmt: skip
        out += [Config(p, b, {"placement": p, "prefetch": None}) for p in ("static-layers", "static-frequency")]
        out += [
            Config("static-frequency+buddy", b, {"placement": "static-frequency", "prefetch": None, "standin": "buddy"})
        ]  # BuddyMoE's setting: a static cache
        for kind, o in STANDINS.items():
            out += [Config(f"lru+{kind}", b, {**LRU, **o}), Config(f"auto+{kind}", b, {**AUTO, **o})]
        out += [Config(f"lookahead+{kind}", b, {**LOOKAHEAD, **STANDINS[kind]}) for kind in ("buddy", "lowrank")]
        out += [Config("auto+mixed-fast", b, {**AUTO, "standin": "mixed", "standin_fraction": 0.2,
                                              "critical_weight": 0.9})]  # fmt: skip
    if mode != "full":
        keep = LEAN if mode == "default" else SHORT
        out = [c for c in out if c.name in keep and c.budget in (None, 1.0, 0.25)]
    return out + [replace(c, compiled=True) for c in out if compiled and (mode == "full" or c.name in COMPILED)]


@torch.no_grad()
def prefill_speed(model, prompts: list[torch.Tensor]) -> float:
    t0 = time.perf_counter()
    for ids in prompts:
        model(input_ids=ids, cache=DynamicCache(), use_cache=True)
    return sum(p.numel() for p in prompts) / (time.perf_counter() - t0)


def decode_speed_and_bpb(model, tokenizer, text: str, static: bool = False) -> tuple[float, float, int]:
    """Teacher-forced decoding of `text`, one token at a time: (tokens/s, bits per byte, tokens decoded)."""
    n = len(tokenizer(text)["input_ids"])
    t0 = time.perf_counter()
    bpb = bits_per_byte(model, tokenizer, text, seq_len=STATIC_LEN, decode=True, static_cache=static)
    return n / (time.perf_counter() - t0), bpb, n


@torch.no_grad()
def warm_up(model, prompts: list[torch.Tensor]) -> None:
    """Compile a compiled row's decode graphs before it is timed: a few decode steps, as measured."""
    decode_logits(model, prompts[0][:, :4], STATIC_LEN)


@contextmanager
def loaded_cpu(processes: int = 2) -> Iterator[None]:
    """Two busy processes on the CPU, and an empty host-cost cache, for the duration of the block: what `patch`
    measures of the host then is a loaded machine's speed (the decode that follows runs without them)."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(processes)]
    old = os.environ.get("OFFLOAD_MOE_CACHE_DIR")
    try:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["OFFLOAD_MOE_CACHE_DIR"] = cache
            time.sleep(0.2)  # let them spin up
            yield
    finally:
        for p in busy:
            p.kill()
            p.wait()
        if old is None:
            os.environ.pop("OFFLOAD_MOE_CACHE_DIR", None)
        else:
            os.environ["OFFLOAD_MOE_CACHE_DIR"] = old


@contextmanager
def compiled_forward(model, mode: str | None = None) -> Iterator[None]:
    """The resident model as users compile it: torch.compile(model.forward, mode=mode), for the duration of the
    block."""
    model.forward = torch.compile(model.forward, mode=mode)
    try:
        yield
    finally:
        del model.forward


def calibrate_link(model, tokenizer, text: str, expert_bytes: int, static: bool = False) -> tuple[float, float]:
    """Link speed at which copying one expert takes COPY_TO_LAYER_RATIO x one layer's decode compute."""
    speed, _, _ = decode_speed_and_bpb(model, tokenizer, text, static)
    layer_s = 1.0 / speed / len(moe_blocks(model))
    return expert_bytes / (COPY_TO_LAYER_RATIO * layer_s) / 1e9, layer_s


def emulated_host(link: EmulatedLink, expert_bytes: int, expert_params: int) -> EmulatedHost:
    """A host with HOST_TO_LINK_BANDWIDTH x the link's bandwidth whose compute equals one copy at CROSSOVER_TOKENS."""
    copy_s = link.seconds(expert_bytes)
    flops = 2 * expert_params * CROSSOVER_TOKENS / copy_s
    return EmulatedHost(gbps=HOST_TO_LINK_BANDWIDTH * link.gbps, gflops=flops / 1e9)


def run_model(name: str, path: Path, args: argparse.Namespace) -> dict:
    """Every configuration of the mode on one model: one JSON-ready dict."""
    device = resolve_device(args.device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPE).eval().to(device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(corpus_text("val", max_bytes=args.prompts * 4000), return_tensors="pt")["input_ids"][0]
    prompts = [ids[i * args.prompt_len : (i + 1) * args.prompt_len][None].to(device) for i in range(args.prompts)]
    eval_text = corpus_text("val", max_bytes=args.eval_bytes)
    blocks = moe_blocks(model)
    experts = [getattr(b.experts, n) for b in blocks for n in b.expert_param_names()]
    n_experts = len(blocks) * blocks[0].num_experts
    all_bytes = sum(p.numel() * p.element_size() for p in experts)
    expert_bytes, expert_params = all_bytes // n_experts, sum(p.numel() for p in experts) // n_experts
    calibration = args.out / f"calibration-{name}.safetensors"  # calibrated on the training split only
    calibrate(model, [corpus_text("train", max_bytes=args.calibration_bytes)], tokenizer, path=calibration)
    quality = standin_quality(model, tokenizer, calibration, corpus_text("val", max_bytes=args.quality_bytes))
    link, host, layer_s = None, None, None
    quarter = eval_text[: len(eval_text) // 4]
    if device.type == "cpu":  # emulated: calibrated to this machine's own compute
        gbps, layer_s = calibrate_link(model, tokenizer, quarter, expert_bytes)
        link = EmulatedLink(gbps=args.link_gbps or gbps)
        host = emulated_host(link, expert_bytes, expert_params)
    hit_rates = hit_rate_vs_budget(model, tokenizer, eval_text, HIT_RATE_BUDGETS)
    recall = lookahead_recall(model, tokenizer, eval_text)
    cfgs = configs(args.mode, name, compiled=not args.eager_only)
    if args.rows:
        unknown = set(args.rows.split(",")) - {c.name for c in cfgs}
        if unknown:
            raise SystemExit(
                f"unknown rows {sorted(unknown)} in mode {args.mode!r}; its rows: {[c.name for c in cfgs]}"
            )
        cfgs = [c for c in cfgs if c.name in args.rows.split(",")]
    runs, compiled_runs, compiled_link, c_link, c_host = [], [], None, link, host
    for cfg in tqdm(cfgs, desc=f"offload configs ({name})", unit="cfg"):
        if cfg.compiled and compiled_link is None and link is not None:
            # compiled rows meet a link as much faster as their compute: calibrated on the compiled resident model
            with compiled_forward(model):
                warm_up(model, prompts)
                gbps_c, layer_s_c = calibrate_link(model, tokenizer, quarter, expert_bytes, static=True)
            compiled_link = {"gbps": args.link_gbps or gbps_c, "layer_decode_seconds": layer_s_c}
            c_link = EmulatedLink(gbps=compiled_link["gbps"])
            c_host = emulated_host(c_link, expert_bytes, expert_params)
        out, lk, hs = (compiled_runs, c_link, c_host) if cfg.compiled else (runs, link, host)
        out.append(run_config(model, tokenizer, cfg, device, lk, hs, calibration, prompts, eval_text, all_bytes,
                              expert_bytes, args.resident_repeats))  # fmt: skip
    return {
        "model": name, "path": str(path), "dtype": str(DTYPE).removeprefix("torch."), "device": str(device),
        "layers": len(blocks), "experts": blocks[0].num_experts, "top_k": blocks[0].top_k,
        "link": {"emulated": link is not None, "gbps": link.gbps if link else None,
                 "copy_to_layer_ratio": COPY_TO_LAYER_RATIO if link else None, "layer_decode_seconds": layer_s},
        "host": ({"emulated": True, "gbps": host.gbps, "gflops": host.gflops,
                  "host_to_link_bandwidth": HOST_TO_LINK_BANDWIDTH, "crossover_tokens": CROSSOVER_TOKENS}
                 if host is not None else {"emulated": False, "cpu": platform.processor()}),
        "expert_bytes": expert_bytes, "expert_bytes_bf16": all_bytes * 2 // experts[0].element_size(),
        "eval_bytes": len(eval_text.encode()), "eval_tokens": len(tokenizer(eval_text)["input_ids"]),
        "prompts": args.prompts, "prompt_tokens": args.prompt_len, "standin_quality": quality,
        "hit_rate_vs_budget": hit_rates, "lookahead_recall": recall, "runs": runs,
        "compiled_link": compiled_link, "compiled_runs": compiled_runs,
    }  # fmt: skip


def as_on_gpu(cfg: Config, link: EmulatedLink | None) -> dict:
    """Behind an emulated link the device stands for a GPU: a row with no miss path gets a GPU's default one."""
    if link is None or "miss_path" in cfg.options:
        return {}
    return {"miss_path": default_miss_path("cuda", cfg.options.get("placement", "dynamic"))}


def run_config(model, tokenizer, cfg: Config, device, link, host, calibration, prompts, eval_text, all_bytes,
               expert_bytes, resident_repeats: int) -> dict:  # fmt: skip
    handle = None
    if cfg.budget is not None:
        uses = (cfg.options.get("standin"), cfg.options.get("placement"))
        needs_calibration = any(u in (*CALIBRATED, "static-frequency") for u in uses)
        chunk = None if link is None else max(1, expert_bytes // CHUNKS_PER_EXPERT)
        with loaded_cpu() if cfg.loaded else contextlib.nullcontext():
            handle = patch(model, budget=cfg.budget, device=device, options=emulated(link, host, chunk_bytes=chunk),
                           calibration=calibration if needs_calibration else None, compile=cfg.compiled,
                           **as_on_gpu(cfg, link), **cfg.options)  # fmt: skip
    try:
        with compiled_forward(model) if cfg.compiled and handle is None else contextlib.nullcontext():
            if cfg.compiled:
                warm_up(model, prompts)
            # compiled rows measure decode only: a prefill graph would cost every row another compile (bench time)
            prefill = None if cfg.compiled else prefill_speed(model, prompts)
            speeds = []
            for _ in range(resident_repeats if cfg.budget in (None, 1.0) else 1):
                if handle:
                    handle.reset_stats()  # the counters of the last pass
                decode, bpb, tokens = decode_speed_and_bpb(model, tokenizer, eval_text, static=cfg.compiled)
                speeds.append(decode)
            decode = statistics.median(speeds)
        decode_seconds = tokens / decode
        s = handle.stats() if handle else None
    finally:
        if handle:
            handle.unpatch()
    per_token = lambda v: v / tokens if s else 0.0  # noqa: E731
    return {
        "name": cfg.name, "budget": cfg.budget if cfg.budget is not None else 1.0,
        **{k: v.__name__ if isinstance(v, type) else v for k, v in cfg.options.items()},
        "compiled": cfg.compiled,
        "decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill, "bits_per_byte": bpb,
        "hit_rate": s.hit_rate if s else 1.0, "misses_per_token": per_token(s.misses if s else 0),
        "substituted_per_token": per_token(s.substituted if s else 0),
        "host_per_token": per_token(s.host_experts if s else 0), "copies_per_token": per_token(s.copies if s else 0),
        "lowbit_copies_per_token": per_token(s.lowbit_copies if s else 0),
        "bytes_per_token": per_token(s.bytes_copied if s else 0), "stall_seconds": s.stall_seconds if s else 0.0,
        "host_wait_seconds": s.host_wait_seconds if s else 0.0, "slots": s.slots if s else None,
        "explored_per_token": per_token(s.explored if s else 0),
        "standin_bytes": s.standin_bytes if s else 0, "prefetches_per_token": per_token(s.prefetches if s else 0),
        "prefetch_precision": s.prefetch_precision if s else 0.0,
        "background_copies_per_token": per_token(s.background_copies if s else 0),
        "speculative_link_share": s.speculative_link_seconds / s.link_seconds if s and s.link_seconds else 0.0,
        "link_busy_share": s.link_seconds / decode_seconds if s else 0.0, "preemptions": s.preemptions if s else 0,
        "device_expert_bytes": s.resident_bytes if s else all_bytes,  # slot pool plus stand-ins, real sizes
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--mode",
        choices=["quick", "default", "full", "cw-sweep"],
        default="default",
        help="how much to measure (see configs())",
    )
    ap.add_argument("--models", help=f"comma-separated, from {sorted(MODELS)} (default: mixtral; both with full)")
    ap.add_argument("--rows", help="comma-separated row names: only these rows of the mode (default: all)")
    ap.add_argument("--model", type=Path, default=None, help="one model directory instead of the reference models")
    ap.add_argument("--device", default=None)
    ap.add_argument("--link-gbps", type=float, default=None, help="emulated link speed (default: calibrated)")
    ap.add_argument("--prompts", type=int, default=None, help="prefill prompts (default: the mode's)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--eval-bytes", type=int, default=None, help="held-out text decoded per config (mode's)")
    ap.add_argument("--quality-bytes", type=int, default=None, help="held-out text of the stand-in quality table")
    ap.add_argument("--calibration-bytes", type=int, default=120_000, help="training text the calibration reads")
    ap.add_argument(
        "--resident-repeats",
        type=int,
        default=RESIDENT_REPEATS,
        help="decode passes of the rows with every expert resident (their median is reported)",
    )
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--eager-only", action="store_true", help="no compile=True twins (full mode: half the time)")
    args = ap.parse_args(argv)
    if args.resident_repeats < 1:
        ap.error(f"--resident-repeats must be at least 1 (the median of that many passes), got {args.resident_repeats}")
    args.prompts = args.prompts or {"quick": 1, "default": 2, "full": 2, "cw-sweep": 1}[args.mode]
    args.quality_bytes = args.quality_bytes or {"quick": 4000, "default": 4000}.get(args.mode, 16_000)
    args.eval_bytes = args.eval_bytes or {"quick": 500, "default": 500, "full": 700, "cw-sweep": 700}[args.mode]
    names = args.models or ("mixtral,fine" if args.mode in ("full", "cw-sweep") else "mixtral")
    unknown = [m for m in names.split(",") if m and m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {sorted(MODELS)}, or pass --model DIR")
    chosen = {"custom": args.model} if args.model else {m: MODELS[m] for m in names.split(",") if m}
    try:
        for path in chosen.values():
            model_dir(path)
    except (FileNotFoundError, KeyError) as e:
        raise SystemExit(str(e)) from e
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "mode": args.mode, "eager_only": args.eager_only, "decode": "teacher-forced, one token at a time "
              "through the KV cache, over held-out text",
              "models": [run_model(name, path, args) for name, path in chosen.items()]}  # fmt: skip
    result["seconds"] = time.time() - t0
    (args.out / "offload.json").write_text(json.dumps(result, indent=1, default=str))
    for m in result["models"]:
        print_table(m)
        print_goals(m)
        print_compiled(m)
        print_quality(m)
    pngs = plot_offload(result, args.out)
    print(f"wrote {args.out / 'offload.json'}, " + ", ".join(str(p) for p in pngs))


if __name__ == "__main__":
    main()
