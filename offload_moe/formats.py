"""Low-bit formats that checkpoints store expert matrices in, and how each decodes.

A format describes one weight matrix [rows, cols] (rows: outputs, cols: inputs, as a checkpoint stores it): the
tensors it is made of, named by the suffix that follows the matrix's own name in the checkpoint, and how a batch of
them decodes to the compute dtype. Decoding follows each format's public definition and rounds once, from float32:
  - MXFP4 (OCP microscaling; gpt-oss): `_blocks` uint8 [rows, cols/32, 16], two e2m1 values a byte, low nibble first;
    `_scales` uint8 [rows, cols/32], a power of two biased by 127 per block of 32 values.
  - FP8 with block scales (DeepSeek-V3, Qwen3-FP8): `.weight` float8_e4m3fn [rows, cols], `.weight_scale_inv` float32
    [ceil(rows/128), ceil(cols/128)] multiplying each 128 x 128 block.
  - int4 / int8 weight-only with group scales (compressed-tensors "pack-quantized", the layout GPTQ/AWQ exports
    share): `.weight_packed` int32 [rows, ceil(cols*bits/32)], value i of a row at bit i*bits, stored plus
    2**(bits-1); `.weight_scale` [rows, cols/group]; symmetric (no zero point).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

Parts = dict[str, tuple[tuple[int, ...], torch.dtype]]  # suffix -> (shape, dtype) of one matrix's tensors


class MatrixFormat(ABC):
    """How a checkpoint stores one weight matrix [rows, cols]."""

    name: ClassVar[str]
    values: ClassVar[str]  # the suffix of the tensor holding the values ...
    scales: ClassVar[str]  # ... and of the one holding their scales
    weight: ClassVar[str] = ".weight"  # the suffix of the matrix once decoded (a plain checkpoint's name for it)

    @abstractmethod
    def matrix_shape(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
        """[rows, cols] of the matrix these stored tensors (one matrix's, or a fused [E, ...] stack's) decode to."""

    @abstractmethod
    def parts(self, rows: int, cols: int) -> Parts:
        """The tensors one matrix is stored as, by suffix, with their shapes and dtypes."""

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """[n, rows, cols] in `dtype` from a batch of n matrices' parts (each [n, *shape])."""

    def with_scales(self, dtype: torch.dtype) -> MatrixFormat:
        """This format with its scales in `dtype`, where the checkpoint chooses their dtype."""
        return self

    def bad_values(self, suffix: str, t: torch.Tensor) -> str | None:
        """What is wrong with the values of a (small) scale tensor, or None; formats without one never say."""
        return None


class Plain(MatrixFormat):
    """A matrix stored as it is computed (bf16, fp16, fp32): a bias, or a checkpoint that is not low-bit."""

    name = "plain"
    values = scales = ""

    def __init__(self, suffix: str, dtype: torch.dtype):
        self.suffix, self.dtype = suffix, dtype

    def matrix_shape(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
        raise NotImplementedError("a plain matrix's shape is its tensor's")

    def parts(self, rows: int, cols: int) -> Parts:
        return {self.suffix: ((rows, cols) if cols else (rows,), self.dtype)}

    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        return parts[self.suffix].to(dtype)


class Mxfp4(MatrixFormat):
    name = "mxfp4"
    values, scales, weight = "_blocks", "_scales", ""
    BLOCK = 32
    E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)

    def __init__(self) -> None:
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def matrix_shape(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
        return values.shape[-3], values.shape[-2] * self.BLOCK

    def parts(self, rows: int, cols: int) -> Parts:
        if cols % self.BLOCK:
            raise ValueError(f"an MXFP4 matrix needs a multiple of {self.BLOCK} columns, this one has {cols}")
        g = cols // self.BLOCK
        return {"_blocks": ((rows, g, self.BLOCK // 2), torch.uint8), "_scales": ((rows, g), torch.uint8)}

    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        # a value (<= 2 significant bits) times a power of two is exact in any float dtype: computed in `dtype`
        pairs, powers = self._lookup(parts["_blocks"].device, dtype)
        values = F.embedding(parts["_blocks"].int(), pairs).flatten(-2)  # [n, R, G, 32]: low nibble first
        scale = F.embedding(parts["_scales"].int(), powers)  # [n, R, G, 1]
        return (values * scale).flatten(-2)  # [n, R, C]

    def bad_values(self, suffix: str, t: torch.Tensor) -> str | None:
        if suffix == "_scales" and bool((t == 255).any()):
            return "holds 255, the MX scale that means NaN"
        return None

    def _lookup(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """byte -> its two values [256, 2], and scale byte -> its power of two [256, 1], in `dtype` on `device`."""
        key = (device, dtype)
        if key not in self._tables:
            lut = torch.tensor(self.E2M1, dtype=torch.float32)
            byte = torch.arange(256)
            pairs = torch.stack((lut[byte & 15], lut[byte >> 4]), dim=-1)
            powers = torch.exp2(byte.float() - 127).unsqueeze(-1)
            self._tables[key] = (pairs.to(device, dtype), powers.to(device, dtype))
        return self._tables[key]


class Fp8Block(MatrixFormat):
    name = "fp8-block"
    values, scales = ".weight", ".weight_scale_inv"

    def __init__(self, block: tuple[int, int] = (128, 128)):
        self.block = block

    def matrix_shape(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
        return values.shape[-2], values.shape[-1]

    def parts(self, rows: int, cols: int) -> Parts:
        br, bc = self.block
        return {
            ".weight": ((rows, cols), torch.float8_e4m3fn),
            ".weight_scale_inv": ((math.ceil(rows / br), math.ceil(cols / bc)), torch.float32),
        }

    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        w, s = parts[".weight"].float(), parts[".weight_scale_inv"]  # [n, R, C], [n, R/br, C/bc]
        br, bc = self.block
        s = s.repeat_interleave(br, dim=1)[:, :rows].repeat_interleave(bc, dim=2)[:, :, :cols]
        return (w * s).to(dtype)

    def bad_values(self, suffix: str, t: torch.Tensor) -> str | None:
        if suffix == ".weight_scale_inv" and not bool(torch.isfinite(t).all() and (t > 0).all()):
            return "has scales that are not finite and positive"
        return None


class PackedInt(MatrixFormat):
    name = "int-packed"
    values, scales = ".weight_packed", ".weight_scale"

    def __init__(self, bits: int, group: int, scale_dtype: torch.dtype = torch.bfloat16):
        if bits not in (4, 8):
            raise ValueError(f"pack-quantized weights of {bits} bits are not supported; 4 and 8 are")
        self.bits, self.group, self.scale_dtype = bits, group, scale_dtype

    def matrix_shape(self, values: torch.Tensor, scales: torch.Tensor) -> tuple[int, int]:
        return values.shape[-2], scales.shape[-1] * self.group

    def with_scales(self, dtype: torch.dtype) -> MatrixFormat:
        return PackedInt(self.bits, self.group, dtype)

    def parts(self, rows: int, cols: int) -> Parts:
        if cols % self.group:
            raise ValueError(f"group size {self.group} does not divide the matrix's {cols} columns")
        return {
            ".weight_packed": ((rows, math.ceil(cols * self.bits / 32)), torch.int32),
            ".weight_scale": ((rows, cols // self.group), self.scale_dtype),
        }

    def decode(self, parts: dict[str, torch.Tensor], rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        packed, scale = parts[".weight_packed"], parts[".weight_scale"]  # [n, R, W], [n, R, C/group]
        byte = packed.contiguous().view(torch.uint8)  # [n, R, 4W], little-endian: value 0 in the lowest bits
        if self.bits == 4:
            byte = torch.stack((byte & 15, byte >> 4), dim=-1).flatten(-2)
        q = byte[..., :cols].float() - (1 << (self.bits - 1))  # [n, R, C]
        return (q * scale.float().repeat_interleave(self.group, dim=-1)).to(dtype)

    def bad_values(self, suffix: str, t: torch.Tensor) -> str | None:
        if suffix == ".weight_scale" and not bool(torch.isfinite(t.float()).all()):
            return "has scales that are not finite"
        return None


FORMATS = ("mxfp4", "fp8 (block scales, e4m3)", "compressed-tensors pack-quantized (int4/int8, symmetric groups)")


def matrix_format(quantization: dict[str, Any] | None) -> MatrixFormat | None:
    """The expert matrices' format from a config.json's `quantization_config`; None when it has none. A format this
    library cannot read raises ValueError naming it."""
    if quantization is None:
        return None
    method = quantization.get("quant_method")
    if method == "mxfp4":
        return Mxfp4()
    if method == "fp8" and quantization.get("fmt", "e4m3") == "e4m3" and quantization.get("weight_block_size"):
        return Fp8Block(tuple(quantization["weight_block_size"]))
    if method == "compressed-tensors" and quantization.get("format") == "pack-quantized":
        groups = list(quantization.get("config_groups", {}).values())
        weights = [g.get("weights") or {} for g in groups]
        if len(weights) == 1 and weights[0].get("symmetric", True) and weights[0].get("strategy") == "group":
            w = weights[0]
            return PackedInt(int(w["num_bits"]), int(w["group_size"]))
    raise ValueError(f"quantization_config {_short(quantization)} is a format offload_moe cannot read")


def _short(q: dict[str, Any]) -> str:
    keys = ("quant_method", "fmt", "format", "weight_block_size")
    return "{" + ", ".join(f"{k}: {q[k]!r}" for k in keys if k in q) + "}"
