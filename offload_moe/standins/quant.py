"""Low-bit copies of expert weights: group-wise asymmetric quantization, codes bit-packed at their real size.

A matrix W [out, in] is cut into groups of `group` consecutive input columns; each group of each row gets a scale s
and a zero z (float16), and each weight the code q = clamp(round(w / s + z), 0, 2^bits - 1), so w ~ (q - z) s.
Codes of any width (2, 3, 4 or 8 bits) are packed into a uint8 stream, so a 3-bit matrix really takes 3/8 of a byte
per weight. `optimize=True` refines the zeros as HQQ does (half-quadratic, an l_p<1 loss that ignores outliers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 3, 4, 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N] (each < 2^bits) -> their bit stream as uint8 [ceil(N * bits / 8)]."""
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((codes.reshape(-1, 1) >> shifts) & 1).reshape(-1)  # [N * bits]
    pad = (-stream.numel()) % 8
    stream = torch.cat([stream, stream.new_zeros(pad)]).reshape(-1, 8)
    return (stream << torch.arange(8, dtype=torch.uint8, device=codes.device)).sum(-1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The inverse of `pack`: uint8 codes [n]."""
    stream = ((packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1).reshape(-1)
    bits_of = stream[: n * bits].reshape(n, bits)
    return (bits_of << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)


@dataclass
class QuantTensor:
    """A matrix [out, in] as packed `bits`-bit codes with float16 scales and zeros per row and group of columns."""

    packed: torch.Tensor  # uint8 [ceil(out * padded_in * bits / 8)]
    scale: torch.Tensor  # float16 [out, groups]
    zero: torch.Tensor  # float16 [out, groups]
    shape: tuple[int, int]
    bits: int
    group: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def to(self, device: torch.device | str) -> QuantTensor:
        return QuantTensor(
            self.packed.to(device), self.scale.to(device), self.zero.to(device), self.shape, self.bits, self.group
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, cols = self.shape
        groups = self.scale.shape[1]
        codes = unpack(self.packed, self.bits, out * groups * self.group).reshape(out, groups, self.group)
        w = (codes.float() - self.zero.float()[..., None]) * self.scale.float()[..., None]  # [out, G, g]
        return w.reshape(out, groups * self.group)[:, :cols].to(dtype)


def quantize(w: torch.Tensor, bits: int, group: int = 64, optimize: bool = False) -> QuantTensor:
    """Group-wise asymmetric `bits`-bit quantization of w [out, in] (computed in float32)."""
    if bits not in BITS:
        raise ValueError(f"bits={bits} is not supported; choose one of {list(BITS)}")
    if group < 1:
        raise ValueError(f"group size must be >= 1, got {group}")
    out, cols = w.shape
    group = min(group, cols)
    pad = (-cols) % group
    x = torch.nn.functional.pad(w.float(), (0, pad), mode="replicate").reshape(out, -1, group)  # [out, G, g]
    top = 2**bits - 1
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    scale = ((hi - lo) / top).clamp_min(1e-8)
    zero = -lo / scale
    if optimize:
        zero = _hqq_zero(x, scale, zero, top)
    scale, zero = scale.half(), zero.half()
    codes = (x / scale.float() + zero.float()).round().clamp(0, top).to(torch.uint8)
    return QuantTensor(pack(codes.reshape(-1), bits), scale[..., 0], zero[..., 0], (out, cols), bits, group)


def _hqq_zero(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    top: int,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> torch.Tensor:
    """HQQ's half-quadratic refinement of the zeros (scales fixed): alternate a sparse estimate of the error
    (l_p shrinkage, p < 1, so outliers do not pull the grid) with the zero that best explains the rest."""
    for _ in range(iters):
        q = (x / scale + zero).round().clamp(0, top)
        err = x - (q - zero) * scale
        shrunk = torch.sign(err) * torch.relu(err.abs() - (1 / beta) * err.abs().clamp_min(1e-8) ** (p - 1))
        zero = (q - (x - shrunk) / scale).mean(-1, keepdim=True)
        beta *= kappa
    return zero


def quant_bytes(shape: tuple[int, ...], bits: int, group: int) -> int:
    """Bytes of one [out, in] matrix quantized at `bits` in groups of `group` (codes, float16 scales and zeros)."""
    out, cols = shape
    group = min(group, cols)
    groups = -(-cols // group)
    return -(-out * groups * group * bits // 8) + 2 * 2 * out * groups
