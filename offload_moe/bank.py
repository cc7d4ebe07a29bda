"""The resident stand-ins of every expert, each of its own kind: low-rank factors or quantized weights (one byte
budget for all kinds; calibration can choose per expert). A stand-in computes an approximation of its expert's
output for the tokens routed to it, on the device, without waiting for the real expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hooks import MoEBlock

from .calibrate import expert_weights
from .host import expert_forward, one_expert_twin
from .plan import Plan
from .quant import QuantTensor, quantize
from .standins import StandIns, lowrank
from .store import HostStore

Key = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Kind:
    """What a stand-in is: ("quant", bits) or ("lowrank", rank)."""

    name: str
    level: int

    def __str__(self) -> str:
        return f"{self.name}{self.level}"


class StandinBank:
    """(layer, expert) -> its stand-in, resident on the device.

    Quantized stand-ins run the experts module's own kernel (any layout, biases included) on dequantized weights;
    low-rank ones (gated experts only) multiply by their factors.
    """

    def __init__(self, experts_modules: list[torch.nn.Module], names: list[str], dtype: torch.dtype):
        self._twins = [one_expert_twin(m) for m in experts_modules]
        self.names, self.dtype = names, dtype
        self._quant: dict[Key, dict[str, QuantTensor | torch.Tensor]] = {}
        self._lowrank: dict[Key, tuple[StandIns, int, int]] = {}  # key -> (factors, layer, expert) in them
        self.kinds: dict[Key, Kind] = {}

    @property
    def nbytes(self) -> int:
        total = 0
        for weights in self._quant.values():
            total += sum(w.nbytes if isinstance(w, QuantTensor) else w.numel() * w.element_size()
                         for w in weights.values())  # fmt: skip
        for factors, layer, expert in self._lowrank.values():
            total += factors.expert_bytes(layer, expert)
        return total

    def add_quant(self, key: Key, weights: dict[str, torch.Tensor], bits: int, group: int, optimize: bool,
                  device: torch.device) -> None:  # fmt: skip
        """Quantize one expert's matrices (its 1-D biases stay as they are, in the compute dtype)."""
        self._quant[key] = {n: quantize(w, bits, group, optimize).to(device) if w.dim() == 2
                            else w.to(device, self.dtype) for n, w in weights.items()}  # fmt: skip
        self.kinds[key] = Kind("quant", bits)

    def add_lowrank(self, key: Key, factors: StandIns, layer: int, expert: int) -> None:
        self._lowrank[key] = (factors, layer, expert)
        self.kinds[key] = Kind("lowrank", factors.rank)

    def apply(self, layer: int, expert: int, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """w[:, None] * approximation of the expert's output on x [n, H] -> [n, H]."""
        key = (layer, expert)
        if key in self._quant:
            weights = {n: t.dequantize(self.dtype) if isinstance(t, QuantTensor) else t
                       for n, t in self._quant[key].items()}  # fmt: skip
            return expert_forward(self._twins[layer], self.names, weights, x, w)
        factors, fl, fe = self._lowrank[key]
        act = self._twins[layer].act_fn
        return (factors.apply(fl, fe, x, act) * w[:, None]).to(x.dtype)


def build_bank(options, calib, blocks: list[MoEBlock], store: HostStore, plan: Plan, dev: torch.device,
               dtype: torch.dtype) -> StandinBank:  # fmt: skip
    """Every expert's stand-in, of the kind the options ask for, on the device."""
    bank = StandinBank([b.experts for b in blocks], store.names, dtype)
    if options.standin == "quant":
        for b in blocks:
            for e in range(b.num_experts):
                weights = store.expert_tensors(b.index, e)
                bank.add_quant((b.index, e), weights, options.bits, options.group_size, options.quant_optimize, dev)
        return bank
    if options.standin == "mixed":  # each expert's kind was chosen by the plan from the calibration's errors
        factors = calib.standins.to(dev, dtype)
        for b in blocks:
            for e, kind in enumerate(plan.standin_kinds[b.index]):
                if kind.startswith("quant"):
                    bank.add_quant((b.index, e), store.expert_tensors(b.index, e), int(kind[5:]),
                                   calib.meta["group_size"], True, dev)  # fmt: skip
                else:
                    bank.add_lowrank((b.index, e), factors, b.index, e)
        return bank
    rank = plan.standin_rank
    if calib is not None:  # activation-aware factors, truncated to the rank the budget allows
        factors = calib.standins.truncated(rank).to(dev, dtype)
    else:  # weight-only truncated SVD, expert by expert, on the device (a GPU factors large experts fast)
        per_expert = [[{n: lowrank(w.to(dev), rank) for n, w in expert_weights(b, store, b.index, e).items()}
                       for e in range(b.num_experts)] for b in blocks]  # fmt: skip
        u = {n: torch.stack([torch.stack([f[n][0] for f in layer]) for layer in per_expert]) for n in store.names}
        v = {n: torch.stack([torch.stack([f[n][1] for f in layer]) for layer in per_expert]) for n in store.names}
        factors = StandIns(u, v).to(dev, dtype)
    for b in blocks:
        for e in range(b.num_experts):
            bank.add_lowrank((b.index, e), factors, b.index, e)
    return bank
