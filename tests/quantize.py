"""Reference quantizers: write a model's checkpoint in a low-bit format as the hub ships them, from each format's public
definition, and leave the model holding the same weights dequantized (the reference the packed runtime must equal).

  - mxfp4 (OCP Microscaling v1.0, as gpt-oss ships): blocks of 32 along the input dimension share a power-of-two
    scale 2**(floor(log2(amax)) - 2) (2 is e2m1's largest exponent), values rounded to the nearest e2m1 value
    (ties to even, saturated at 6); fused `experts.{w}_blocks` / `_scales`, biases plain.
  - fp8 (DeepSeek-V3 / Qwen3-FP8): 128 x 128 blocks, scale_inv = amax / 448, values cast to e4m3; per-expert
    `experts.{e}.{w}.weight` / `.weight_scale_inv`, attention projections too.
  - int4 / int8 (compressed-tensors pack-quantized, symmetric groups): scale = amax / (2**(bits-1) - 1) in the model
    dtype, q = round(w / scale) clamped, packed into int32 little end first after adding 2**(bits-1).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from offload_moe import compat
from offload_moe.blocks import moe_blocks

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
ATTENTION = (".q_proj.weight", ".k_proj.weight", ".v_proj.weight", ".o_proj.weight")
FORMATS = ("mxfp4", "fp8", "int4", "int8")


def save_quantized(model: torch.nn.Module, path: str | Path, fmt: str, group: int = 128) -> int:
    """Write `model` to `path` with its experts (and, for fp8 / int, its attention projections) in `fmt`; the model's
    weights become the dequantized ones, in their dtype. group: the int formats' group size. Returns the checkpoint's
    expert bytes."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    expert_bytes = 0
    hub_names = model.config.model_type == "mixtral"  # Mixtral's hub checkpoints: block_sparse_moe, w1 / w3 / w2
    for b in moe_blocks(model):
        layout = compat.expert_layout(b.experts)
        transposed = layout is not None and layout.is_transposed
        for name in b.expert_param_names():
            key = f"{b.name}.experts.{name}"
            w = state.pop(key)
            if w.dim() == 2:  # a bias: plain
                out[key] = w.contiguous()
                expert_bytes += w.nbytes
                continue
            m = w.transpose(1, 2) if transposed else w  # [E, out, in]
            if fmt == "mxfp4":
                blocks, scales, deq = mxfp4(m)
                out[key + "_blocks"], out[key + "_scales"] = blocks, scales
                expert_bytes += blocks.nbytes + scales.nbytes
            else:
                parts = [("gate_proj", 0), ("up_proj", 1)] if name == "gate_up_proj" else [("down_proj", 0)]
                rows = m.shape[1] // len(parts)
                deq = torch.empty_like(m, dtype=torch.float32)
                for e in range(m.shape[0]):
                    for part, half in parts:
                        sub = m[e, half * rows : (half + 1) * rows]
                        stored, deq[e, half * rows : (half + 1) * rows] = _quantize(sub, fmt, group)
                        prefix = f"{b.name}.experts.{e}.{_hub(part) if hub_names else part}"
                        for suffix, t in stored.items():
                            out[prefix + suffix] = t
                            expert_bytes += t.nbytes if suffix != ".weight_shape" else 0
            with torch.no_grad():
                getattr(b.experts, name).copy_(deq.transpose(1, 2) if transposed else deq)
    if fmt != "mxfp4":  # attention in the low-bit format too, as DeepSeek-V3 and compressed-tensors exports do
        for key in [k for k in state if k.endswith(ATTENTION)]:
            w = state.pop(key)
            stored, deq = _quantize(w, fmt, group)
            for suffix, t in stored.items():
                out[key[: -len(".weight")] + suffix] = t
            with torch.no_grad():
                model.get_parameter(key).copy_(deq)
    for k, v in state.items():
        out[k] = v.contiguous()
    if hub_names:
        out = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in out.items()}
    model.tie_weights()
    names = {t.data_ptr(): k for k, t in out.items()}
    out = {k: v for k, v in out.items() if names[v.data_ptr()] == k}  # tied weights once
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = _config(fmt, group)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return expert_bytes


def mxfp4(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[..., rows, cols] -> blocks uint8 [..., rows, cols/32, 16], scales uint8 [..., rows, cols/32], and the
    dequantized values in float32 [..., rows, cols]."""
    x = m.float().unflatten(-1, (-1, 32))  # [..., R, G, 32]
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = x / torch.exp2(exp)
    mag = scaled.abs().clamp(max=6.0)
    # nearest e2m1 magnitude, ties to the even code (the one with a 0 low bit)
    dist = (mag.unsqueeze(-1) - E2M1).abs()  # [..., 32, 8]
    nearest = dist == dist.min(-1, keepdim=True).values
    code = (nearest * (2 - torch.arange(8) % 2)).argmax(-1)  # [..., 32]: the even code of a tie
    code = code | ((scaled < 0) & (code > 0)).to(torch.int64) << 3
    deq = torch.where(code >= 8, -E2M1[code & 7], E2M1[code & 7]) * torch.exp2(exp)
    nibbles = code.to(torch.uint8)
    blocks = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)  # low nibble first
    scales = (exp.squeeze(-1) + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous(), deq.flatten(-2)


def fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, cols] -> e4m3 values, float32 scale_inv [ceil(rows/128), ceil(cols/128)], dequantized float32."""
    rows, cols = w.shape
    r, c = math.ceil(rows / block), math.ceil(cols / block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w.float()
    tiles = padded.view(r, block, c, block)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448.0).clamp(min=1e-12)  # [r, c]
    q = (tiles / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    deq = (q.float() * scale[:, None, :, None]).view(r * block, c * block)[:rows, :cols]
    return q.view(r * block, c * block)[:rows, :cols].contiguous(), scale, deq


def int_packed(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[rows, cols] -> int32 packed [rows, ceil(cols*bits/32)], scales [rows, cols/group] in w's dtype, dequantized
    float32."""
    rows, cols = w.shape
    qmax = (1 << (bits - 1)) - 1
    g = w.float().view(rows, cols // group, group)
    scale = (g.abs().amax(-1) / qmax).clamp(min=1e-8).to(w.dtype)  # stored in the model's dtype
    q = torch.round(g / scale.float().unsqueeze(-1)).clamp(-qmax - 1, qmax).view(rows, cols)
    deq = (q.view(rows, -1, group) * scale.float().unsqueeze(-1)).view(rows, cols)
    u = (q.to(torch.int64) + (1 << (bits - 1))).view(rows, -1, 32 // bits)  # values of one int32 word
    shifts = torch.arange(32 // bits) * bits
    words = (u << shifts).sum(-1)  # value i at bit i*bits
    packed = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return packed.contiguous(), scale.contiguous(), deq


def _quantize(w: torch.Tensor, fmt: str, group: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One [rows, cols] matrix in an fp8 / int format: its tensors by suffix, and it dequantized (float32)."""
    if fmt == "fp8":
        q, s, deq = fp8_block(w)
        return {".weight": q, ".weight_scale_inv": s}, deq
    packed, scale, deq = int_packed(w, int(fmt[3:]), group)
    return {".weight_packed": packed, ".weight_scale": scale, ".weight_shape": torch.tensor(w.shape)}, deq


def _hub(part: str) -> str:
    return {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[part]


def _config(fmt: str, group: int) -> dict:
    if fmt == "mxfp4":
        plain = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
        return {"quant_method": "mxfp4", "modules_to_not_convert": plain}
    if fmt == "fp8":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    weights = {"num_bits": int(fmt[3:]), "type": "int", "symmetric": True, "strategy": "group", "group_size": group}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}},
        "ignore": ["lm_head"],
    }
