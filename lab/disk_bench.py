"""`make bench-disk` (not part of `make bench`): a checkpoint larger than RAM, its experts streamed from disk into a RAM
budget, each configuration in its own process under a memory limit that counts the page cache, against the page
cache alone and accelerate's disk offload. REAL disk and memory; nothing is emulated.

    python -m lab.disk_bench [--gib G] [--budgets 0.125,0.25] [--tokens 8] [--prompt 128] [--dir DIR] [--keep]

The checkpoint has Mixtral's layout and random bf16 weights (hidden 2048, expert intermediate 7168, 8 experts, top-2,
one safetensors shard per layer); its size defaults to 1.1x this machine's RAM (`--gib` sets it). Before each run the
checkpoint's page cache is dropped. Writes bench-results/disk.json and disk-speed.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lab.disk_read import MIB, measure, write_file
from offload_moe.progress import progress
from tests.memory_limit import MemoryLimit
from tests.page_cache import drop_cache

GEOMETRIES = {  # "mixtral": Mixtral-8x7B's experts at a quarter of its width; "small": for the tests
    "mixtral": {"hidden_size": 2048, "intermediate_size": 7168, "num_local_experts": 8, "num_experts_per_tok": 2,
                "vocab_size": 32000, "num_attention_heads": 16, "num_key_value_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 1024, "num_local_experts": 8, "num_experts_per_tok": 2,
              "vocab_size": 1000, "num_attention_heads": 4, "num_key_value_heads": 2},
}  # fmt: skip
SLACK = 2 << 30  # the memory limit above the RAM budget and the dense weights: the interpreter, torch, activations
CONFIGS = {  # name: load() keywords; "page-cache" and "accelerate-disk" are the baselines
    "lru": {"miss_path": "fetch", "prefetch": None},
    "lookahead": {"miss_path": "fetch", "prefetch": "lookahead"},
    "default": {},
    "lru+drop": {"miss_path": "fetch", "prefetch": None, "standin": "drop"},  # lossy: a missed expert is skipped
    "page-cache": {"miss_path": "host", "prefetch": None, "read": "mmap"},  # at a budget of two experts, see below
    "accelerate-disk": None,
}
LOSSY = {"lru+drop"}


def expert_bytes(geometry: dict) -> int:
    return 3 * geometry["hidden_size"] * geometry["intermediate_size"] * 2  # w1, w3, w2 in bf16


def write_checkpoint(path: Path, layers: int, geometry: dict) -> None:
    """Mixtral's hub layout (per-expert w1/w3/w2), random bf16 weights, one shard per layer and one for the rest."""
    from safetensors.torch import save_file
    from transformers import MixtralConfig

    cfg = MixtralConfig(num_hidden_layers=layers, max_position_embeddings=4096, **geometry)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(shape, generator=gen) * std).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    for layer in progress(range(layers + 1), "writing the checkpoint", unit="shard"):
        p = f"model.layers.{layer}."
        if layer == layers:  # the last shard: embeddings, final norm, head
            tensors = {"model.embed_tokens.weight": rand(cfg.vocab_size, h), "lm_head.weight": rand(cfg.vocab_size, h),
                       "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}  # fmt: skip
        else:
            tensors = {p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
                       p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
                       p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                       p + "block_sparse_moe.gate.weight": rand(e, h, std=1.0)}  # fmt: skip
            for x in range(e):
                q = f"{p}block_sparse_moe.experts.{x}."
                tensors |= {q + "w1.weight": rand(i, h), q + "w3.weight": rand(i, h), q + "w2.weight": rand(h, i)}
        shard = f"model-{layer:05d}-of-{layers + 1:05d}.safetensors"
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


MXFP4_GEOMETRY = {"hidden_size": 1024, "intermediate_size": 1024, "num_local_experts": 128, "num_experts_per_tok": 4,
                  "vocab_size": 32000, "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
                  "sliding_window": 128, "num_hidden_layers": 36}  # fmt: skip


def write_mxfp4_checkpoint(path: Path) -> tuple[int, int]:
    """gpt-oss-120b's routing shape (36 layers x 128 experts, top-4) at hidden = intermediate = 1024, in the hub's
    MXFP4 layout (fused `experts.{w}_blocks` / `_scales`, bf16 biases), random values; one shard per layer. Returns
    (the experts' bytes as stored, the same experts' bytes in bf16)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GptOssConfig

    cfg = GptOssConfig(max_position_embeddings=4096, **MXFP4_GEOMETRY)
    cfg.quantization_config = {"quant_method": "mxfp4"}
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    weight_map: dict[str, str] = {}
    rest = {}
    for name, p in meta.state_dict().items():
        if ".experts." in name:
            continue
        if name.endswith("norm.weight"):
            rest[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        elif p.dim() == 1:
            rest[name] = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            rest[name] = (torch.randn(p.shape, generator=gen) * 0.02).to(torch.bfloat16)
    save_file(rest, path / "model-rest.safetensors", metadata={"format": "pt"})
    weight_map |= dict.fromkeys(rest, "model-rest.safetensors")
    stored = 0
    for layer in range(cfg.num_hidden_layers):
        q = f"model.layers.{layer}.mlp.experts."
        tensors = {}
        for w, (rows, cols) in {"gate_up_proj": (2 * i, h), "down_proj": (h, i)}.items():
            tensors[q + w + "_blocks"] = torch.randint(
                0, 256, (e, rows, cols // 32, 16), dtype=torch.uint8, generator=gen
            )
            tensors[q + w + "_scales"] = torch.randint(
                118, 122, (e, rows, cols // 32), dtype=torch.uint8, generator=gen
            )
            tensors[q + w + "_bias"] = torch.zeros(e, rows, dtype=torch.bfloat16)
        shard = f"model-{layer:05d}.safetensors"
        save_file(tensors, path / shard, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(tensors, shard)
        stored += sum(t.nbytes for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    bf16 = cfg.num_hidden_layers * e * (3 * h * i + 3 * h) * 2
    return stored, bf16


@contextmanager
def mixtral_checkpoint(args: argparse.Namespace, ram: int) -> Iterator[tuple[Path, int]]:
    """The Mixtral-layout checkpoint of `args.geometry` and `args.gib` (default 1.1x `ram`): (its directory, its
    layers), written unless one is there, removed afterwards unless `args.keep`."""
    geometry = GEOMETRIES[args.geometry]
    layer_bytes = geometry["num_local_experts"] * expert_bytes(geometry)
    layers = max(2, math.ceil((args.gib * (1 << 30) if args.gib else 1.1 * ram) / layer_bytes))
    ckpt = (args.dir or Path(tempfile.gettempdir())) / f"offload-moe-disk-bench-{args.geometry}-{layers}L"
    try:
        if not (ckpt / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            write_checkpoint(ckpt, layers, geometry)
            os.sync()  # on the disk before any run: reads beside the write-back are slower (the first run's were)
            print(f"wrote a {layers}-layer checkpoint in {time.perf_counter() - t0:.0f} s: {ckpt}", flush=True)
        yield ckpt, layers
    finally:
        if not args.keep:
            remove_checkpoint(ckpt)


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint directory the bench wrote (its files are flat)."""
    for f in ckpt.glob("*"):
        f.unlink()
    if ckpt.exists():
        ckpt.rmdir()


def run_mxfp4(args: argparse.Namespace, ram: int) -> None:
    """The MXFP4 row: a checkpoint larger than RAM in bf16 but not in MXFP4, run from `load` with every expert
    packed in a RAM tier, inside a memory limit below the bf16 experts' size."""
    root = args.dir or Path(tempfile.gettempdir())
    ckpt = root / "offload-moe-disk-bench-gpt-oss-mxfp4"
    try:
        t0 = time.perf_counter()
        stored, bf16 = write_mxfp4_checkpoint(ckpt)
        print(f"wrote the MXFP4 checkpoint in {time.perf_counter() - t0:.0f} s: {stored / 2**30:.1f} GiB of experts "
              f"({bf16 / 2**30:.1f} GiB in bf16; RAM {ram / 2**30:.1f} GiB)", flush=True)  # fmt: skip
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        limit = size + SLACK
        spec = {"path": str(ckpt), "name": "mxfp4", "budget": args.mxfp4_budget, "prompt": args.prompt,
                "tokens": args.tokens, "vocab": MXFP4_GEOMETRY["vocab_size"]}  # fmt: skip
        t0 = time.perf_counter()
        result = run_one(spec, limit)
    finally:
        remove_checkpoint(ckpt)
    row = {"shape": "gpt-oss-120b routing, hidden = intermediate = 1024", "format": "mxfp4", "machine_ram_bytes": ram,
           "checkpoint_bytes": size, "expert_bytes": stored, "bf16_expert_bytes": bf16, "memory_limit_bytes": limit,
           "budget": args.mxfp4_budget, "ram_budget": 1.0, "seconds": time.perf_counter() - t0, **result}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk-mxfp4.json").write_text(json.dumps(row, indent=1))
    print(json.dumps({k: v for k, v in row.items() if k != "tokens"}, indent=1))
    print(f"wrote {args.out / 'disk-mxfp4.json'}")


def run_child(spec: dict) -> dict:
    """One configuration in this process: load, time to first token of the prompt, then greedy decode."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from offload_moe import fit, load
    from offload_moe.runtime.process import resident_memory, storage_read_bytes

    torch.manual_seed(0)
    path, name = Path(spec["path"]), spec["name"]
    t0 = time.perf_counter()
    handle, plan = None, None
    if name == "accelerate-disk":
        model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.bfloat16,
                                                     max_memory={"cpu": spec["ram_bytes"]},
                                                     offload_folder=spec["offload_folder"]).eval()  # fmt: skip
        for f in Path(spec["offload_folder"]).rglob("*"):  # what it wrote there: cold, as in a later session
            if f.is_file():
                drop_cache(f)
    elif name == "mxfp4":  # every expert packed in a RAM tier, a budget of them in the device pool
        model, handle = load(path, budget=spec["budget"], device="cpu", ram_budget=1.0, miss_path="fetch")
    elif name == "sized":  # --sizing: the budget as given ("auto" or a fraction), the plan fit() makes of it first
        plan = fit(path, spec["budget"], "cpu", ram_budget=spec["ram_budget"], max_tokens=spec["prompt"] + 64)
        model, handle = load(path, budget=spec["budget"], device="cpu", ram_budget=spec["ram_budget"],
                             max_tokens=spec["prompt"] + 64)  # fmt: skip
    else:
        options = dict(CONFIGS[name])
        budget = spec["two_experts"] if name == "page-cache" else spec["budget"]  # fractions of the experts
        model, handle = load(path, budget=budget, device="cpu", **options)
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, spec["vocab"], (1, spec["prompt"]), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache()
    with torch.no_grad():
        t0 = time.perf_counter()
        token = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t0
        tokens = [int(token)]
        if handle is not None:
            handle.reset_stats()
        read0, t0 = storage_read_bytes(), time.perf_counter()
        for _ in range(spec["tokens"]):
            token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            tokens.append(int(token))
        decode_s = time.perf_counter() - t0
        read = storage_read_bytes()
    stats = handle.stats() if handle is not None else None
    rss = resident_memory()
    return {"load_s": load_s, "ttft_s": ttft, "decode_tokens_per_s": spec["tokens"] / decode_s, "tokens": tokens,
            "disk_bytes_per_token": None if read is None else (read - read0) / spec["tokens"],
            "hit_rate": None if stats is None else stats.hit_rate, "rss_anon_bytes": rss and rss[0],
            "rss_file_bytes": rss and rss[1], "budget_bytes": stats and stats.budget_bytes,
            "fit_tokens_per_s": plan and plan.decode_tokens_per_s, "fit": plan and str(plan)}  # fmt: skip


def run_one(spec: dict, limit: int) -> dict:
    """`spec` in a fresh process inside a new memory limit, the checkpoint's page cache dropped first."""
    for f in Path(spec["path"]).glob("*.safetensors"):
        drop_cache(f)
    group = MemoryLimit.make(limit)
    cmd = [sys.executable, "-m", "lab.disk_bench", "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=group.enter if group else None)
        peak = group.peak() if group else None
    finally:
        if group:
            group.close()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed: over the memory limit" if proc.returncode in (-9, 137) else proc.stderr.strip()[-400:]
        return {"error": why}
    return {**json.loads(lines[-1]), "peak_memory_bytes": peak}


def compare(runs: list[dict]) -> None:
    """Add each run's speed against the baselines at its budget and whether its greedy tokens equal accelerate's."""
    for r in runs:
        same = {x["name"]: x for x in runs if x["budget"] == r["budget"] and "error" not in x}
        for base in ("page-cache", "accelerate-disk"):
            ok = "error" not in r and base in same
            r[f"x_{base}"] = r["decode_tokens_per_s"] / same[base]["decode_tokens_per_s"] if ok else None
        ok = "error" not in r and "accelerate-disk" in same
        r["tokens_equal_accelerate"] = r["tokens"] == same["accelerate-disk"]["tokens"] if ok else None
        ceiling = r.get("ceiling_tokens_per_s")
        r["x_ceiling"] = r["decode_tokens_per_s"] / ceiling if ceiling and "error" not in r else None


def table(result: dict) -> str:
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = [f"disk bench: {result['checkpoint_bytes'] / 2**30:.1f} GiB checkpoint ({result['layers']} layers) on "
             f"{result['machine']}; REAL disk ({result['disk_read_gbps']:.2f} GB/s) and memory limit "
             f"({result['memory_limit']}); {result['prompt_tokens']}-token prompt, {result['decode_tokens']} decode "
             "tokens",
             f"{'config':<16}{'budget':>7}{'tok/s':>8}{'x pc':>6}{'x acc':>6}{'ceil':>8}{'x ceil':>7}{'TTFT s':>8}"
             f"{'MB/tok':>8}{'hits':>6}{'peak GiB':>9}{'limit':>7}  same tokens as accelerate"]  # fmt: skip
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"{r['name']:<16}{r['budget']:>7.3f}  failed: {r['error'][:80]}")
            continue
        per_tok, peak = r["disk_bytes_per_token"], r["peak_memory_bytes"]
        lines.append(f"{r['name']:<16}{r['budget']:>7.3f}{r['decode_tokens_per_s']:>8.3f}"
                     f"{f(r['x_page-cache'], '.2f'):>6}{f(r['x_accelerate-disk'], '.2f'):>6}"
                     f"{f(r['ceiling_tokens_per_s'], '.3f'):>8}"
                     f"{f(r['x_ceiling'], '.2f'):>7}{r['ttft_s']:>8.1f}{f(per_tok and per_tok / 1e6, '.0f'):>8}"
                     f"{f(r['hit_rate'], '.2f'):>6}{f(peak and peak / 2**30, '.2f'):>9}"
                     f"{r['memory_limit_bytes'] / 2**30:>7.2f}  {f(r['tokens_equal_accelerate'], '')}")  # fmt: skip
    return "\n".join(lines)


def plot(result: dict, out: Path) -> None:
    """Decode tokens/s per configuration at each budget, with each run's disk ceiling as a tick."""
    from lab.figures import colour, figure

    runs = [r for r in result["runs"] if "error" not in r]
    budgets = sorted({r["budget"] for r in runs})
    names = list(dict.fromkeys(r["name"] for r in runs))
    fig, ax = figure(figsize=(8, 4))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        for i, b in enumerate(budgets):
            r = next((r for r in runs if r["name"] == name and r["budget"] == b), None)
            if r is None:
                continue
            x = i + j * width
            ax.bar(x, r["decode_tokens_per_s"], width, color=colour(j), label=name if i == 0 else None)
            if r["ceiling_tokens_per_s"]:
                ax.plot([x - width / 2, x + width / 2], [r["ceiling_tokens_per_s"]] * 2, color="black", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(budgets))], [f"RAM budget {b:g}" for b in budgets])
    ax.set_ylabel("decode tokens/s (black: disk ceiling)")
    ax.set_title(f"{result['checkpoint_bytes'] / 2**30:.1f} GiB checkpoint from disk, REAL (not emulated)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


def run_sizing(args: argparse.Namespace) -> None:
    """budget="auto" (and ram_budget="auto": none on a CPU device) against each hand-chosen budget, every run in its
    own process under the same memory limit; fit()'s decode estimate beside each measured rate."""
    geometry = GEOMETRIES[args.geometry]
    limit = int(args.limit_gib * (1 << 30))
    with mixtral_checkpoint(args, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) as (ckpt, layers):
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        runs = []
        for budget in ["auto", *(float(b) for b in args.budgets.split(","))]:
            ram_budget = "auto" if budget == "auto" else None
            spec = {"path": str(ckpt), "name": "sized", "budget": budget, "ram_budget": ram_budget,
                    "prompt": args.prompt, "tokens": args.tokens, "vocab": geometry["vocab_size"]}  # fmt: skip
            t0 = time.perf_counter()
            row = {"budget": budget, "memory_limit_bytes": limit, **run_one(spec, limit)}
            row["seconds"] = time.perf_counter() - t0
            if "error" not in row:
                row["fit_over_measured"] = row["fit_tokens_per_s"] / row["decode_tokens_per_s"]
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "fit")}), flush=True)
    done = [r for r in runs if "error" not in r and r["budget"] != "auto"]
    auto = next((r for r in runs if r["budget"] == "auto" and "error" not in r), None)
    best = max((r["decode_tokens_per_s"] for r in done), default=None)
    result = {"checkpoint_bytes": size, "layers": layers, "memory_limit_bytes": limit, "runs": runs,
              "auto_over_best_hand_chosen": auto and best and auto["decode_tokens_per_s"] / best,
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk-sizing.json").write_text(json.dumps(result, indent=1))
    for r in runs:
        print(r.get("fit", ""))
        print(f"budget {r['budget']}: " + (r["error"] if "error" in r else
              f"{r['decode_tokens_per_s']:.3f} tok/s measured, {r['fit_tokens_per_s']:.3f} estimated, budget "
              f"{r['budget_bytes'] / 2**30:.2f} GiB, peak {r['peak_memory_bytes'] / 2**30:.2f} GiB"))  # fmt: skip
    print(f"auto over the best hand-chosen budget: {result['auto_over_best_hand_chosen']}")
    print(f"wrote {args.out / 'disk-sizing.json'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=None, help="checkpoint size (default: 1.1x this machine's RAM)")
    ap.add_argument("--budgets", default="0.125,0.25", help="RAM budgets, fractions of the experts' bytes")
    ap.add_argument("--tokens", type=int, default=8, help="greedy decode tokens per run")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens (time to first token)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"a subset of {','.join(CONFIGS)}")
    ap.add_argument("--geometry", choices=list(GEOMETRIES), default="mixtral")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse one found there)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    ap.add_argument("--mxfp4", action="store_true", help="run only the MXFP4 row (bench-results/disk-mxfp4.json)")
    ap.add_argument("--mxfp4-budget", type=float, default=0.25, help="the MXFP4 row's device budget")
    ap.add_argument(
        "--sizing",
        action="store_true",
        help="budget='auto' and ram_budget='auto' against hand-chosen "
        "budgets under one memory limit, each after fit()'s plan (bench-results/disk-sizing.json)",
    )
    ap.add_argument("--limit-gib", type=float, default=9.0, help="--sizing's memory limit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    if args.mxfp4:
        run_mxfp4(args, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        return
    if args.sizing:
        run_sizing(args)
        return
    names = args.configs.split(",")
    unknown = set(names) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configurations {sorted(unknown)}; choose from {', '.join(CONFIGS)}")
    budgets = [float(b) for b in args.budgets.split(",")]
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    geometry = GEOMETRIES[args.geometry]
    root = args.dir or Path(tempfile.gettempdir())
    with mixtral_checkpoint(args, ram) as (ckpt, layers):
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        total_experts = layers * geometry["num_local_experts"] * expert_bytes(geometry)
        dense = size - total_experts
        probe = root / f"disk-read-{uuid.uuid4().hex[:8]}.bin"
        write_file(probe, min(1 << 30, size))
        try:
            disk = measure(probe, 4 * MIB)
        finally:
            probe.unlink()
        gbps = disk["pread+dontneed"]["gbps"]
        print(f"checkpoint {size / 2**30:.1f} GiB ({layers} layers), RAM {ram / 2**30:.1f} GiB, disk reads "
              f"{gbps:.2f} GB/s (pread + DONTNEED, 4 MiB)", flush=True)  # fmt: skip
        runs = []
        for budget in budgets:
            ram_budget = int(budget * total_experts)
            limit = ram_budget + dense + SLACK
            for name in names:
                with tempfile.TemporaryDirectory(dir=root) as offload_folder:
                    spec = {"path": str(ckpt), "name": name, "budget": budget, "prompt": args.prompt,
                            "tokens": args.tokens, "ram_bytes": ram_budget + dense, "vocab": geometry["vocab_size"],
                            "two_experts": 2 / (layers * geometry["num_local_experts"]),
                            "offload_folder": offload_folder}  # fmt: skip
                    t0 = time.perf_counter()
                    result = run_one(spec, limit)
                row = {"name": name, "budget": budget, "memory_limit_bytes": limit, "lossless": name not in LOSSY,
                       "seconds": time.perf_counter() - t0, **result}  # fmt: skip
                per_token = row.get("disk_bytes_per_token")
                row["ceiling_tokens_per_s"] = gbps * 1e9 / per_token if per_token else None
                runs.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus, {ram / 2**30:.1f} GiB RAM",
              "checkpoint_bytes": size, "layers": layers, "geometry": geometry, "disk_read_gbps": gbps,
              "expert_bytes": expert_bytes(geometry),
              "disk_read": disk, "prompt_tokens": args.prompt, "decode_tokens": args.tokens,
              "memory_limit": "cgroup" if any(r.get("peak_memory_bytes") is not None for r in runs) else
              "none (no memory cgroup could be made here): peak memory not measured", "runs": runs}  # fmt: skip
    compare(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk.json").write_text(json.dumps(result, indent=1))
    plot(result, args.out / "disk-speed.png")
    print(table(result))
    print(f"wrote {args.out / 'disk.json'}, {args.out / 'disk-speed.png'}")


if __name__ == "__main__":
    main()
