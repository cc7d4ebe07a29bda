"""`offload_moe.fit`'s decode estimate against the decode it then measures: the reference models loaded from their
checkpoints at each budget on the CPU device (a copy is a memcpy; nothing emulated), decoding held-out text, each
after the plan made of the checkpoint (its resident step and miss cost timed on skeletons), and patched in memory after
the plan made of the model (the resident step timed on it); both plans replay the routing trace of a calibration on
the training split through the cache.

    python -m lab.fit_bench [--budgets 0.25,0.5,1.0] [--tokens 64] [--rounds 3] [--out bench-results]

Writes bench-results/fit.json. The goal (issue 43): each estimate within 30% of the measured rate.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import offload_moe
from lab.scale_bench import greedy
from tests.corpus import corpus_text
from tests.helpers import FINE_MODEL_DIR, REFERENCE_MODEL_DIR

MODELS = {"mixtral": REFERENCE_MODEL_DIR, "fine": FINE_MODEL_DIR}
GOAL = 0.30  # |estimate / measured - 1|
PROMPT_TOKENS = 64
CALIBRATION_BYTES = 30_000


def calibration_of(name: str, path: Path, out: Path, nbytes: int) -> Path:
    """A calibration of the model on the training split's first `nbytes` (the decode reads held-out text)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    file, text = out / f"fit-calibration-{name}.safetensors", corpus_text("train", nbytes)
    offload_moe.calibrate(model, [text], AutoTokenizer.from_pretrained(path), path=file)
    return file


def run(name: str, path: Path, budget: float, tokens: int, rounds: int, calibration: Path) -> dict:
    """Each plan against the run it plans: fit(checkpoint) against `load` (misses read from the files), fit(model)
    against `patch` of the model in memory (misses copied from RAM)."""
    prompt = AutoTokenizer.from_pretrained(path)(corpus_text("val", 4000), return_tensors="pt")["input_ids"]
    from_file = offload_moe.fit(path, budget, "cpu", calibration=calibration)
    model, handle = offload_moe.load(path, budget=budget, device="cpu")
    loaded, loaded_hit = decode(model, handle, prompt, tokens, rounds)
    resident = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()  # as users hold it
    in_memory = offload_moe.fit(resident, budget, "cpu", calibration=calibration)
    patched, patched_hit = decode(resident, offload_moe.patch(resident, budget, "cpu"), prompt, tokens, rounds)
    return {
        "model": name,
        "budget": budget,
        "measured_tokens_per_s": loaded,
        "measured_hit_rate": loaded_hit,
        "fit_checkpoint_tokens_per_s": from_file.decode_tokens_per_s,
        "fit_checkpoint_over_measured": from_file.decode_tokens_per_s / loaded,
        "measured_patched_tokens_per_s": patched,
        "measured_patched_hit_rate": patched_hit,
        "fit_in_memory_tokens_per_s": in_memory.decode_tokens_per_s,
        "fit_in_memory_over_measured": in_memory.decode_tokens_per_s / patched,
        "expected_hit_rate": from_file.hit_rate,
        "hit_rate_source": from_file.hit_rate_source,
        "misses_per_token": from_file.misses_per_token,
        "missing_calls_per_token": from_file.missing_calls_per_token,
        "call_seconds": from_file.call_seconds,
        "probes": from_file.probes,
        "miss_seconds": from_file.miss_seconds,
        "step_seconds_skeleton": from_file.step_seconds,
        "step_seconds_measured": in_memory.step_seconds,
    }


def decode(model, handle, prompt: torch.Tensor, tokens: int, rounds: int) -> tuple[float, float]:
    """Decode tokens/s over `tokens` greedy steps after a PROMPT_TOKENS prompt (the median of `rounds` runs: this
    machine has slow spells), and the last run's hit rate; unpatches."""
    try:
        speeds = [greedy(model, prompt[:, :PROMPT_TOKENS], tokens + 1, handle)[2] for _ in range(rounds)]
        return statistics.median(speeds), handle.stats().hit_rate
    finally:
        handle.unpatch()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.25,0.5,1.0")
    ap.add_argument("--tokens", type=int, default=64, help="decode steps timed (fewer: a noisier hit rate)")
    ap.add_argument("--rounds", type=int, default=3, help="decode runs per row (their median)")
    ap.add_argument("--calibration-bytes", type=int, default=CALIBRATION_BYTES, help="training text calibrated on")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    if args.calibration_bytes < 1:
        ap.error(f"--calibration-bytes must be at least 1 (bytes of training text), got {args.calibration_bytes}")
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    calibrations = {n: calibration_of(n, p, args.out, args.calibration_bytes) for n, p in MODELS.items()}
    rows = [
        run(n, p, float(b), args.tokens, args.rounds, calibrations[n])
        for n, p in MODELS.items()
        for b in args.budgets.split(",")
    ]
    doc = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
           "device": "cpu", "tokens": args.tokens, "goal": GOAL, "rows": rows, "seconds": time.time() - t0}  # fmt: skip
    (args.out / "fit.json").write_text(json.dumps(doc, indent=1))
    print(f"{'model':<9}{'budget':>7}{'load':>8}{'fit(file)':>11}{'x':>6}{'patch':>8}{'fit(mem)':>10}{'x':>6}"
          f"{'hits':>6}{'exp':>6}")  # fmt: skip
    for r in rows:
        print(f"{r['model']:<9}{r['budget']:>7.2f}{r['measured_tokens_per_s']:>8.1f}"
              f"{r['fit_checkpoint_tokens_per_s']:>11.1f}{r['fit_checkpoint_over_measured']:>6.2f}"
              f"{r['measured_patched_tokens_per_s']:>8.1f}"
              f"{r['fit_in_memory_tokens_per_s']:>10.1f}{r['fit_in_memory_over_measured']:>6.2f}"
              f"{r['measured_hit_rate']:>6.2f}{r['expected_hit_rate']:>6.2f}")  # fmt: skip
    print(f"wrote {args.out / 'fit.json'} ({doc['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
