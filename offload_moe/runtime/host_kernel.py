"""One expert's forward on the host, at the speed of memory: the experts module's declared math (transformers'
`use_experts_implementation` layout: gate or not, biases, transposed weights, post-expert norm, the module's own
gate function) as plain matmuls on the host copy of each weight, piece by piece where a checkpoint stores an expert
in pieces (no assembled copy). A GEMV reads each weight once, so this runs near the memory's read bandwidth, where
the stock grouped kernel on a one-expert twin pays its fixed cost per call. Its matmuls are the stock kernel's own
(the same rows, the same dtype, the input cast to the weights' dtype first): `HostKernel.check` compares the two bit
for bit at patch time, and a module whose kernel they do not match keeps the stock kernel on its twin.

`host_precision="int8"` / `"int4"`: weight-only low-bit copies of every expert's matrices, built at patch time,
multiplied by torch's CPU kernels for packed weights (lossy; see `offload_moe.options`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from offload_moe import compat
from offload_moe.runtime.kernels import expert_forward, one_expert_twin

PRECISIONS = (None, "int8", "int4")
INT4_GROUPS = (128, 64, 32)  # the int4 kernel's group sizes, largest first (fewer scales)
INT4_OUT_MULTIPLE = 16  # the int4 kernel packs output rows in blocks of 16


class LowBit:
    """One matrix [out, in] in `precision`: int8 with one scale per output row, or int4 in groups along the input,
    packed for torch's CPU kernels; `matmul(x)` is x @ W.T."""

    def __init__(self, w: torch.Tensor, precision: str):
        self.precision, self.dtype, self.shape = precision, w.dtype, tuple(w.shape)
        # zero inputs up to the kernel's block: they add nothing
        self.pad = -w.shape[1] % (compat.INT8_IN_MULTIPLE if precision == "int8" else INT4_GROUPS[-1])
        out_pad = 0 if precision == "int8" else -w.shape[0] % INT4_OUT_MULTIPLE  # zero rows, sliced off
        w = F.pad(w.float(), (0, self.pad, 0, out_pad))
        if precision == "int8":
            self.scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [out]
            self.q = torch.round(w / self.scale[:, None]).clamp(-128, 127).to(torch.int8)
            self.scale = self.scale.to(self.dtype)
            return
        group = next(g for g in INT4_GROUPS if w.shape[1] % g == 0)
        g = w.view(w.shape[0], -1, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15).clamp_min(torch.finfo(torch.float32).tiny)
        q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(w.shape)
        self.group = group
        self.q = compat.int4_pack(q)
        self.scale = torch.stack([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous().to(self.dtype)  # [G, out, 2]

    @property
    def nbytes(self) -> int:
        return self.q.numel() * self.q.element_size() + self.scale.numel() * self.scale.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x.to(self.dtype), (0, self.pad)) if self.pad else x.to(self.dtype)
        if self.precision == "int8":
            return compat.int8_matmul(x, self.q, self.scale)
        return compat.int4_matmul(x, self.q, self.group, self.scale)[:, : self.shape[0]]


class HostKernel:
    """The forward of the experts module `module` for one expert at a time, on host weights.

    `forward(weights, x, w)`: weights maps each expert parameter name to its pieces [(first row, tensor)] (one piece
    for a fused weight); x [n, H]; w [n] routing weights. Returns w[:, None] * expert(x) [n, H] in the kernel's
    accumulation dtype (as `kernels.expert_forward` does): `project(weights, x)`, scaled.
    """

    def __init__(self, module: torch.nn.Module, precision: str | None = None):
        self.module, self.layout, self.precision = module, compat.expert_layout(module), precision
        self._twin = one_expert_twin(module)
        gated = self.layout is not None and self.layout.has_gate
        self.up = "gate_up_proj" if gated else "up_proj"
        self._gate = compat.gate_function(module) if gated else None

    @property
    def direct(self) -> bool:
        """Whether plain matmuls compute this module's experts (else its stock kernel on a one-expert twin)."""
        return self.layout is not None

    def forward(
        self,
        weights: dict[str, list[tuple[int, torch.Tensor]]],
        x: torch.Tensor,
        w: torch.Tensor,
        lowbit: dict[str, LowBit] | None = None,
    ) -> torch.Tensor:
        if not self.direct:
            return expert_forward(self._twin, list(weights), _whole(weights), x, w)
        return self.project(weights, x, lowbit) * w[:, None]

    def project(
        self, weights: dict[str, list[tuple[int, torch.Tensor]]], x: torch.Tensor, lowbit: dict[str, LowBit] | None
    ) -> torch.Tensor:
        """expert(x) [n, H] in the weights' dtype, not yet scaled by the routing weights (`direct` modules only)."""
        layout = self.layout
        proj = self._linear(weights[self.up], x, lowbit and lowbit.get(self.up))
        if layout.has_bias:
            proj.add_(_whole(weights)[self.up + "_bias"])
        proj = self._gate(proj) if layout.has_gate else self.module.act_fn(proj)
        out = self._linear(weights["down_proj"], proj, lowbit and lowbit.get("down_proj"))
        if layout.has_bias:
            out.add_(_whole(weights)["down_proj_bias"])
        if layout.has_post_expert_norm:
            out = self.module.post_expert_norm(out)
        return out

    def _linear(self, pieces: list[tuple[int, torch.Tensor]], x: torch.Tensor, lowbit: LowBit | None) -> torch.Tensor:
        """x @ W.T for W in its pieces of rows (output features), as the stock kernel multiplies: input in the
        weights' dtype."""
        if lowbit is not None:
            return lowbit.matmul(x)
        if self.layout.is_transposed:  # [in, out]: pieces split the input rows only in a per-expert checkpoint
            ((_, weight),) = pieces
            return x.to(weight.dtype) @ weight
        if len(pieces) == 1:
            t = pieces[0][1]
            return F.linear(x if x.dtype == t.dtype else x.to(t.dtype), t)
        return torch.cat([F.linear(x.to(t.dtype), t) for _, t in pieces], dim=-1)

    def lowbit(self, weights: dict[str, torch.Tensor]) -> dict[str, LowBit]:
        """This expert's matrices in the kernel's precision (built once, at patch time); biases stay as they are."""
        out = {}
        for name in (self.up, "down_proj"):
            t = weights[name]
            out[name] = LowBit(t.t().contiguous() if self.layout.is_transposed else t, self.precision)
        return out

    def check(self, weights: dict[str, list[tuple[int, torch.Tensor]]], hidden: int, dtype: torch.dtype) -> bool:
        """Whether plain matmuls give this module's stock kernel's bits on one expert (random inputs); where not, the
        module keeps its twin. Low-bit copies are lossy by choice and are not checked."""
        if not self.direct:
            return False
        gen = torch.Generator().manual_seed(0)
        wide = torch.promote_types(dtype, torch.float32) if compat.casts_input(self.module) else dtype  # as in use
        for n in (1, 3):
            x = torch.randn(n, hidden, generator=gen).to(dtype).to(wide)
            w = torch.rand(n, generator=gen)
            with torch.no_grad():
                if not torch.equal(
                    self.forward(weights, x, w), expert_forward(self._twin, list(weights), _whole(weights), x, w)
                ):
                    self.layout = None
                    return False
        return True


def _whole(weights: dict[str, list[tuple[int, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Each weight as one tensor (pieces concatenated along their rows: a copy only for a split weight)."""
    return {n: p[0][1] if len(p) == 1 else torch.cat([t for _, t in p]) for n, p in weights.items()}
