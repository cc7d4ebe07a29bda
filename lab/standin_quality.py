"""Each stand-in kind's own quality: held-out bits per byte with every expert replaced by its stand-in (quantized at
each bit width, low-rank at the calibrated rank, or its best buddy), measured in place and then restored."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from offload_moe.blocks import moe_blocks
from offload_moe.calibration import load_calibration
from offload_moe.standins.quant import BITS, quantize
from tests.measure import bits_per_byte


@torch.no_grad()
def standin_quality(model: torch.nn.Module, tokenizer, calibration: str | Path, text: str) -> dict[str, dict]:
    """kind -> {"bits_per_byte", "relative"} (relative to the unchanged model), for every stand-in kind."""
    calib = load_calibration(calibration)
    blocks = moe_blocks(model)
    base = bits_per_byte(model, tokenizer, text)
    out = {"resident": {"bits_per_byte": base, "relative": 0.0}}
    group = calib.meta["group_size"]
    kinds: dict[str, Callable[[int, int, str, torch.Tensor], torch.Tensor]] = {
        f"quant{bits}": (lambda layer, e, n, w, bits=bits: quantize(w, bits, group, True).dequantize(w.dtype)
                         if w.dim() == 2 else w) for bits in BITS
    }  # fmt: skip
    if set(blocks[0].expert_param_names()) == {"gate_up_proj", "down_proj"}:
        f = calib.standins
        kinds[f"lowrank{f.rank}"] = lambda layer, e, n, w: (f.u[n][layer, e] @ f.v[n][layer, e]).to(w.dtype)
    buddies = calib.buddies[..., 0]  # [L, E] each expert's best buddy (-1: none found)
    originals = {(b.index, n): getattr(b.experts, n).data.clone() for b in blocks for n in b.expert_param_names()}
    kinds["buddy"] = lambda layer, e, n, w: (originals[(layer, n)][int(buddies[layer, e])]
                                             if buddies[layer, e] >= 0 else w)  # fmt: skip
    try:
        for kind, replace in kinds.items():
            for b in blocks:
                for n in b.expert_param_names():
                    stacked = getattr(b.experts, n).data
                    for e in range(b.num_experts):
                        stacked[e] = replace(b.index, e, n, originals[(b.index, n)][e])
            bpb = bits_per_byte(model, tokenizer, text)
            out[kind] = {"bits_per_byte": bpb, "relative": bpb / base - 1}
    finally:
        for b in blocks:
            for n in b.expert_param_names():
                getattr(b.experts, n).data.copy_(originals[(b.index, n)])
    return out
