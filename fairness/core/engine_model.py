"""The simulated engine: capacity (KV-cache tokens, per-step token budget) and a linear step-time model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EngineModel:
    """A continuous-batching engine.

    step time = step_overhead_s + prefill_s_per_token * prefill tokens + decode_s_per_seq * decoding requests
                + decode_s_per_ctx_token * context tokens of the decoding requests
    """

    kv_tokens: int = 16_000  # KV-cache pool, in tokens
    max_step_tokens: int = 2048  # per-step token budget: decodes (1 each) + prefill chunks ("slora": prompt tokens)
    max_running: int = 256  # requests in the running batch
    step_overhead_s: float = 0.022
    prefill_s_per_token: float = 1.8e-4
    decode_s_per_seq: float = 1.0e-4
    decode_s_per_ctx_token: float = 8.7e-7
    mode: str = "chunked"  # "chunked": continuous batching, chunked prefill, preemption; "slora": see SloraSimulator
    prefill_every: int = 10  # "slora": decode steps between prefill batches

    def __post_init__(self) -> None:
        if self.kv_tokens < 1 or self.max_step_tokens < 1 or self.max_running < 1:
            raise ValueError("kv_tokens, max_step_tokens and max_running must all be >= 1")
        if self.mode not in ("chunked", "slora") or self.prefill_every < 1:
            raise ValueError(
                f"mode must be 'chunked' or 'slora' and prefill_every >= 1, got {self.mode!r}, {self.prefill_every}"
            )
        coefs = (self.step_overhead_s, self.prefill_s_per_token, self.decode_s_per_seq, self.decode_s_per_ctx_token)
        if min(coefs) < 0:
            raise ValueError("step-time coefficients must be >= 0")

    def step_seconds(self, prefill_tokens: int, decode_seqs: int, decode_ctx_tokens: int) -> float:
        return (
            self.step_overhead_s
            + self.prefill_s_per_token * prefill_tokens
            + self.decode_s_per_seq * decode_seqs
            + self.decode_s_per_ctx_token * decode_ctx_tokens
        )

    @classmethod
    def preset(cls, name: str) -> EngineModel:
        if name not in PRESETS:
            raise ValueError(f"unknown engine preset {name!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def fit(cls, samples: list[tuple[int, int, int, float]], **capacity) -> EngineModel:
        """Least-squares fit of the step-time coefficients to measured steps.

        samples: (prefill_tokens, decode_seqs, decode_ctx_tokens, measured step seconds) per step; at least 4 steps
        that vary in all three counts. Coefficients are clipped at 0.
        """
        if len(samples) < 4:
            raise ValueError(f"EngineModel.fit needs at least 4 measured steps, got {len(samples)}")
        a = np.array([[1.0, p, d, c] for p, d, c, _ in samples])
        y = np.array([s for *_, s in samples])
        coef, *_ = np.linalg.lstsq(a, y, rcond=None)
        coef = np.clip(coef, 0.0, None)
        return cls(
            step_overhead_s=float(coef[0]),
            prefill_s_per_token=float(coef[1]),
            decode_s_per_seq=float(coef[2]),
            decode_s_per_ctx_token=float(coef[3]),
            **capacity,
        )


# Roofline estimates (fp16 weights read once per step at the GPU's memory bandwidth, prefill at ~60% of peak
# FLOP/s, KV reads per context token), not measurements. Fit your own with EngineModel.fit.
PRESETS = {
    # Llama-2-7B on an A10G (24 GB, 600 GB/s, 125 TFLOP/s): ~8 GB for KV at 0.5 MB/token.
    "a10g-llama2-7b": EngineModel(
        kv_tokens=16_000,
        max_step_tokens=2048,
        max_running=128,
        step_overhead_s=0.022,
        prefill_s_per_token=1.8e-4,
        decode_s_per_seq=1.0e-4,
        decode_s_per_ctx_token=8.7e-7,
    ),
    # Llama-2-7B on an A100-80GB (2.0 TB/s, 312 TFLOP/s): ~60 GB for KV.
    "a100-llama2-7b": EngineModel(
        kv_tokens=120_000,
        max_step_tokens=4096,
        max_running=256,
        step_overhead_s=0.0070,
        prefill_s_per_token=7.5e-5,
        decode_s_per_seq=6.0e-5,
        decode_s_per_ctx_token=2.5e-7,
    ),
    # The VTC paper's engine: S-LoRA on an A10G with Llama-2-7B, as its artifact runs it (10,000 KV tokens, prefill
    # batches of at most 3,072 prompt tokens every 10 decode steps, full-output reservation, no preemption); the
    # A10G's roofline shape scaled x1.3 so that the paper's overload runs at 893 input + output tokens/s here, where
    # the authors' A10G measured 876-903.
    "a10g-llama2-7b-slora": EngineModel(
        kv_tokens=10_000,
        max_step_tokens=3072,
        max_running=1000,
        step_overhead_s=0.0286,
        prefill_s_per_token=2.34e-4,
        decode_s_per_seq=1.3e-4,
        decode_s_per_ctx_token=1.131e-6,
        mode="slora",
        prefill_every=10,
    ),
    # Llama-3-8B (GQA, 128 kB KV/token) on an H100-80GB (3.35 TB/s, 989 TFLOP/s).
    "h100-llama3-8b": EngineModel(
        kv_tokens=450_000,
        max_step_tokens=8192,
        max_running=512,
        step_overhead_s=0.0050,
        prefill_s_per_token=3.2e-5,
        decode_s_per_seq=4.0e-5,
        decode_s_per_ctx_token=4.0e-8,
    ),
}
