"""The resident stand-ins of every expert, each of its own kind: low-rank factors or quantized weights (one byte
budget for all kinds; calibration can choose per expert). A stand-in computes an approximation of its expert's
output for the tokens routed to it, on the device, without waiting for the real expert."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from hooks import MoEBlock
from offload_moe.calibration import expert_weights
from offload_moe.plan import Plan
from offload_moe.runtime.host import expert_forward, one_expert_twin
from offload_moe.runtime.store import HostStore
from offload_moe.standins.lowrank import StandIns, lowrank
from offload_moe.standins.quant import QuantTensor, quantize

Key = tuple[int, int]  # (layer, expert)
Fetch = Callable[[list[torch.Tensor]], list[torch.Tensor]]  # host tensors -> the same on the device


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

    def pin(self) -> None:
        """Page-lock the quantized stand-ins (a bank kept on the host for CUDA: asynchronous copies)."""
        for key, parts in self._quant.items():
            self._quant[key] = {n: replace(t, packed=t.packed.pin_memory(), scale=t.scale.pin_memory(),
                                           zero=t.zero.pin_memory()) if isinstance(t, QuantTensor) else t.pin_memory()
                                for n, t in parts.items()}  # fmt: skip

    def apply(
        self, layer: int, expert: int, x: torch.Tensor, w: torch.Tensor, fetch: Fetch | None = None
    ) -> torch.Tensor:
        """w[:, None] * approximation of the expert's output on x [n, H] -> [n, H]. fetch: for a bank kept on the
        host, copies the stand-in's tensors to the device first."""
        key = (layer, expert)
        if key in self._quant:
            parts = self._quant[key] if fetch is None else _fetched(self._quant[key], fetch)
            weights = {n: t.dequantize(self.dtype) if isinstance(t, QuantTensor) else t
                       for n, t in parts.items()}  # fmt: skip
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


def build_bank(options, calib, blocks: list[MoEBlock], store: HostStore, plan: Plan, dev: torch.device,
               dtype: torch.dtype) -> StandinBank:  # fmt: skip
    """Every expert's stand-in, of the kind the options ask for, on the device ("lowbit": on the host)."""
    bank = StandinBank([b.experts for b in blocks], store.names, dtype)
    if options.standin in ("quant", "lowbit"):
        home = dev if options.standin == "quant" else torch.device("cpu")
        for b in blocks:
            for e in range(b.num_experts):
                weights = store.expert_tensors(b.index, e)
                bank.add_quant((b.index, e), weights, options.bits, options.group_size, options.quant_optimize, home)
        if home != dev and dev.type == "cuda":
            bank.pin()
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
