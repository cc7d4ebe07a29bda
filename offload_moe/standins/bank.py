"""The resident stand-ins of every expert, each of its own kind: low-rank factors or quantized weights (one byte
budget for all kinds; calibration can choose per expert). A stand-in computes an approximation of its expert's
output for the tokens routed to it, on the device, without waiting for the real expert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from hooks import MoEBlock
from offload_moe.runtime.kernels import expert_forward, one_expert_twin
from offload_moe.runtime.store import HostStore
from offload_moe.runtime.types import ExpertKey
from offload_moe.standins.lowrank import LowRankFactors, lowrank
from offload_moe.standins.quant import QuantTensor, quantize

Fetch = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # host tensors -> the same on the device


class StandinBank:
    """(layer, expert) -> its stand-in, resident on the device.

    Quantized stand-ins run the experts module's own kernel (any layout, biases included) on dequantized weights;
    low-rank ones (gated experts only) multiply by their factors.
    """

    def __init__(self, experts_modules: list[torch.nn.Module], names: list[str], dtype: torch.dtype):
        self._twins = [one_expert_twin(m) for m in experts_modules]
        self.names, self.dtype = names, dtype
        self._quant: dict[ExpertKey, dict[str, QuantTensor | torch.Tensor]] = {}
        self._lowrank: dict[ExpertKey, tuple[LowRankFactors, int, int]] = {}  # key -> (factors, layer, expert) in them

    @property
    def nbytes(self) -> int:
        total = 0
        for weights in self._quant.values():
            total += sum(
                w.nbytes if isinstance(w, QuantTensor) else w.numel() * w.element_size() for w in weights.values()
            )
        for factors, layer, expert in self._lowrank.values():
            total += factors.expert_bytes(layer, expert)
        return total

    def add_quant(
        self,
        key: ExpertKey,
        weights: dict[str, torch.Tensor],
        bits: int,
        group: int,
        optimize: bool,
        device: torch.device,
    ) -> None:
        """Quantize one expert's matrices (its 1-D biases stay as they are, in the compute dtype)."""
        self._quant[key] = {
            n: quantize(w, bits, group, optimize).to(device) if w.dim() == 2 else w.to(device, self.dtype)
            for n, w in weights.items()
        }

    def add_lowrank(self, key: ExpertKey, factors: LowRankFactors, layer: int, expert: int) -> None:
        self._lowrank[key] = (factors, layer, expert)

    def pin(self) -> None:
        """Page-lock the quantized stand-ins (a bank kept on the host for CUDA: asynchronous copies)."""
        for key, parts in self._quant.items():
            self._quant[key] = {
                n: replace(t, packed=t.packed.pin_memory(), scale=t.scale.pin_memory(), zero=t.zero.pin_memory())
                if isinstance(t, QuantTensor)
                else t.pin_memory()
                for n, t in parts.items()
            }

    def apply(
        self, layer: int, expert: int, x: torch.Tensor, w: torch.Tensor, fetch: Fetch | None = None
    ) -> torch.Tensor:
        """w[:, None] * approximation of the expert's output on x [n, H] -> [n, H]. fetch: for a bank kept on the
        host, copies the stand-in's tensors to the device first."""
        key = (layer, expert)
        if key in self._quant:
            parts = self._quant[key] if fetch is None else _fetched(self._quant[key], fetch)
            weights = {n: t.dequantize(self.dtype) if isinstance(t, QuantTensor) else t for n, t in parts.items()}
            return expert_forward(self._twins[layer], self.names, weights, x, w)
        factors, fl, fe = self._lowrank[key]
        act = self._twins[layer].act_fn
        return (factors.apply(fl, fe, x, act) * w[:, None]).to(x.dtype)


def _fetched(parts: dict[str, QuantTensor | torch.Tensor], fetch: Fetch) -> dict[str, QuantTensor | torch.Tensor]:
    """The same stand-in, its tensors copied by `fetch` (one copy for all of them)."""
    flat = [x for t in parts.values() for x in ((t.packed, t.scale, t.zero) if isinstance(t, QuantTensor) else (t,))]
    moved, out = iter(fetch(flat)), {}
    for n, t in parts.items():
        out[n] = (
            replace(t, packed=next(moved), scale=next(moved), zero=next(moved))
            if isinstance(t, QuantTensor)
            else next(moved)
        )
    return out


def quant_bank(
    blocks: list[MoEBlock],
    store: HostStore,
    bits: int,
    group: int,
    optimize: bool,
    home: torch.device,
    dtype: torch.dtype,
) -> StandinBank:
    """Every expert's `bits`-bit copy, kept on `home` (the device; the host for "lowbit")."""
    b = StandinBank([blk.experts for blk in blocks], store.names, dtype)
    for blk in blocks:
        for e in range(blk.num_experts):
            b.add_quant((blk.index, e), store.expert_tensors(blk.index, e), bits, group, optimize, home)
    return b


def mixed_bank(
    blocks: list[MoEBlock],
    store: HostStore,
    calib,
    kinds: tuple[tuple[str, ...], ...],
    dev: torch.device,
    dtype: torch.dtype,
) -> StandinBank:
    """Each expert's stand-in of the kind the plan chose for it from the calibration's errors."""
    b = StandinBank([blk.experts for blk in blocks], store.names, dtype)
    factors = calib.standins.to(dev, dtype)
    for blk in blocks:
        for e, kind in enumerate(kinds[blk.index]):
            if kind.startswith("quant"):
                b.add_quant(
                    (blk.index, e),
                    store.expert_tensors(blk.index, e),
                    int(kind[5:]),
                    calib.meta["group_size"],
                    True,
                    dev,
                )
            else:
                b.add_lowrank((blk.index, e), factors, blk.index, e)
    return b


def lowrank_bank(
    blocks: list[MoEBlock], store: HostStore, calib, rank: int, dev: torch.device, dtype: torch.dtype
) -> StandinBank:
    """Rank-`rank` factors of every expert: the calibration's activation-aware ones (truncated), else a weight-only
    truncated SVD, expert by expert, on the device (a GPU factors large experts fast)."""
    b = StandinBank([blk.experts for blk in blocks], store.names, dtype)
    if calib is not None:
        factors = calib.standins.truncated(rank).to(dev, dtype)
    else:
        per_expert = [
            [
                {n: lowrank(w.to(dev, torch.float32), rank) for n, w in store.expert_tensors(blk.index, e).items()}
                for e in range(blk.num_experts)
            ]
            for blk in blocks
        ]
        u = {n: torch.stack([torch.stack([f[n][0] for f in layer]) for layer in per_expert]) for n in store.names}
        v = {n: torch.stack([torch.stack([f[n][1] for f in layer]) for layer in per_expert]) for n in store.names}
        factors = LowRankFactors(u, v).to(dev, dtype)
    for blk in blocks:
        for e in range(blk.num_experts):
            b.add_lowrank((blk.index, e), factors, blk.index, e)
    return b
