"""`make gpu-check`: on a CUDA machine, a real-link benchmark, then the CUDA tests. The benchmark runs a
Mixtral-geometry model with random weights (hidden 4096, expert intermediate 14336, 8 experts, top-2, bf16, a few
layers): decode and prefill tokens/s per configuration, the copy bandwidth the link achieved, how much of the copying
overlapped compute, the hook's overhead at budget 1.0 against the unpatched model, and decode through a static KV
cache eager, compiled and under CUDA graphs (resident, patched-1.0, auto at 1/4). Writes bench-results/gpu-check.json.

    python -m lab.gpu_check [--layers 4] [--out bench-results] [--skip-tests]

Without CUDA it says so and exits 0 with nothing measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from lab.offload_bench import compiled_forward
from offload_moe.patch import patch

CONFIGS = [  # (name, budget, options); budget None: the unpatched model
    ("resident", None, {}),
    ("patched-1.0", 1.0, {}),
    ("lru", 0.25, {"miss_path": "fetch", "prefetch": None}),
    ("lookahead", 0.25, {"miss_path": "fetch"}),
    ("lookahead+lowrank", 0.25, {"miss_path": "fetch", "standin": "lowrank"}),
    ("host", 0.25, {"miss_path": "host", "prefetch": None}),
    ("auto", 0.25, {"miss_path": "auto", "prefetch": None}),
    ("lru", 0.5, {"miss_path": "fetch", "prefetch": None}),
    ("lookahead", 0.5, {"miss_path": "fetch"}),
    ("host", 0.5, {"miss_path": "host", "prefetch": None}),
    ("auto", 0.5, {"miss_path": "auto", "prefetch": None}),
]


COMPILED = [  # (name, budget, options): decode through a static KV cache, eager, compiled and under CUDA graphs
    ("resident", None, {}),
    ("patched-1.0", 1.0, {}),
    ("auto", 0.25, {"miss_path": "auto", "prefetch": None}),
]
MODES = {"eager": False, "compiled": True, "cuda-graphs": "reduce-overhead"}


def mixtral_geometry(layers: int, hidden: int = 4096, intermediate: int = 14336, vocab: int = 32000):
    """A Mixtral config of `layers` layers at Mixtral-8x7B's width (random weights: speed, not accuracy)."""
    from transformers import MixtralConfig

    return MixtralConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=4096)  # fmt: skip


@torch.no_grad()
def measure(model, device: str, decode_tokens: int, prompt_tokens: int) -> dict:
    """Prefill tokens/s of one prompt, then decode tokens/s of batch-1 greedy decoding from it (the device synced)."""
    from transformers import DynamicCache

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    warm = DynamicCache()  # warm-up: a short prefill and two decode steps load every kernel the timed run uses
    token = model(input_ids=ids[:, :8], cache=warm, use_cache=True).logits[:, -1:].argmax(-1)
    for _ in range(2):
        token = model(input_ids=token, cache=warm, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    cache = DynamicCache()
    out = model(input_ids=ids, cache=cache, use_cache=True)
    sync()
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    sync()
    return {"prefill_tokens_per_s": prompt_tokens / prefill_s,
            "decode_tokens_per_s": decode_tokens / (time.perf_counter() - t0)}  # fmt: skip


@torch.no_grad()
def measure_static(model, device: str, decode_tokens: int, prompt_tokens: int) -> float:
    """Decode tokens/s of batch-1 greedy decoding through a static KV cache, after a warm-up pass that compiles."""
    from transformers import StaticCache

    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids, sync = ids.to(device), (torch.cuda.synchronize if device == "cuda" else (lambda: None))
    speed = 0.0
    for _ in range(2):  # the first pass compiles (and records CUDA graphs)
        cache = StaticCache(config=model.config, max_cache_len=prompt_tokens + decode_tokens + 1)
        pos = torch.arange(prompt_tokens, device=device)[None]
        token = model(input_ids=ids, cache=cache, use_cache=True, position_ids=pos).logits[:, -1:].argmax(-1)
        sync()
        t0 = time.perf_counter()
        for t in range(decode_tokens):
            pos = torch.full((1, 1), prompt_tokens + t, device=device)
            token = model(input_ids=token, cache=cache, use_cache=True, position_ids=pos).logits[:, -1:].argmax(-1)
        sync()
        speed = decode_tokens / (time.perf_counter() - t0)
    return speed


def run_compiled(model, device: str, decode_tokens: int, prompt_tokens: int, modes: dict = MODES) -> list[dict]:
    """Each COMPILED configuration in each of `modes` (MODES: eager, compiled, and under CUDA graphs, which is
    compile="reduce-overhead")."""
    rows = []  # CUDA graphs last: a crash there (seen with torch 2.11's graph partitions) keeps the other rows
    for mode, compile_as in modes.items():
        for name, budget, options in COMPILED:
            as_users = budget is None and compile_as  # the unpatched model, compiled as users compile it
            mode_arg = None if compile_as is True else compile_as
            handle = patch(model, budget=budget, device=device, compile=compile_as, **options) if budget else None
            try:
                with compiled_forward(model, mode_arg) if as_users else contextlib.nullcontext():
                    speed = measure_static(model, device, decode_tokens, prompt_tokens)
            finally:
                if handle is not None:
                    handle.unpatch()
            rows.append({"name": name, "budget": budget or 1.0, "mode": mode, "decode_tokens_per_s": speed})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def run_benchmark(config, device: str, dtype: torch.dtype, decode_tokens: int, prompt_tokens: int,
                  modes: dict = MODES) -> dict:  # fmt: skip
    """Every configuration of CONFIGS on one model: speed, copies, achieved bandwidth, overlap; then COMPILED's in
    each of `modes`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    build_s = time.perf_counter() - t0
    runs = []
    for name, budget, options in CONFIGS:
        handle = patch(model, budget=budget, device=device, **options) if budget is not None else None
        row = {"name": name, "budget": budget if budget is not None else 1.0, **options}
        row.update(measure(model, device, decode_tokens, prompt_tokens))
        if handle is not None:
            s = handle.stats()
            use = handle.cache.link_use()  # since patch, warm-up copies included
            moved, link_s = use["link_bytes"], use["link_seconds"]
            row.update({"slots": s.slots, "hit_rate": s.hit_rate, "copies": s.copies, "host_experts": s.host_experts,
                        "auto_host": s.auto_host, "auto_copy": s.auto_copy, "stall_seconds": s.stall_seconds,
                        "copy_gbps": moved / link_s / 1e9 if link_s else None, "link_busy_seconds": link_s,
                        # what auto weighs, as it happened: seconds per host expert and per copy on the link
                        "host_seconds_per_expert": s.host_seconds / s.host_experts if s.host_experts else None,
                        "link_seconds_per_copy": s.link_seconds / s.copies if s.copies else None,
                        "overlap": 1 - s.stall_seconds / link_s if link_s else None})  # fmt: skip
            handle.unpatch()
        runs.append(row)
        print(json.dumps(row, default=str), flush=True)
    resident = runs[0]["decode_tokens_per_s"]
    overhead = 1 - runs[1]["decode_tokens_per_s"] / resident
    compiled = run_compiled(model, device, decode_tokens, prompt_tokens, modes)
    return {"build_seconds": build_s, "runs": runs, "hook_overhead_at_budget_1": overhead, "compiled": compiled}


def cuda_test_files() -> list[str]:
    """The test modules with CUDA cases (only those: a GPU image may lack the serving extras others import)."""
    cuda = re.compile(r"\b(DEVICES|requires_cuda)\b")
    return sorted(str(p) for p in Path("tests").glob("test_*.py") if cuda.search(p.read_text()))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--skip-tests", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu-check: torch sees no CUDA device on this machine; nothing was measured")
        return
    t0 = time.time()
    result = {
        "machine": {
            "gpu": torch.cuda.get_device_name(),
            "cpu": platform.processor(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cpus": torch.get_num_threads(),
        },  # fmt: skip
        "link": "real PCIe/NVLink host-to-device link, nothing emulated",
        "model": f"Mixtral geometry, {args.layers} layers, random bf16 weights",
        "tests": None,
    }
    result.update(run_benchmark(mixtral_geometry(args.layers), "cuda", torch.bfloat16, args.decode_tokens,
                                args.prompt_tokens))  # fmt: skip
    out = args.out / "gpu-check.json"
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))  # written before the tests, which may run long
    if not args.skip_tests:  # the CUDA-parametrized tests and the CUDA-only ones
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *cuda_test_files(), "-k", "cuda"]
        tests = subprocess.run(cmd, capture_output=True, text=True)
        print(tests.stdout[-3000:], tests.stderr[-2000:], flush=True)
        result["tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-600:]}
    result["seconds"] = time.time() - t0
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out} in {result['seconds']:.0f} s")
    if result["tests"] is not None and result["tests"]["returncode"] != 0:
        raise SystemExit("gpu-check: the CUDA tests failed (above)")


if __name__ == "__main__":
    main()
