"""Lossy stand-ins for a routed expert that is not on the device (a prefetch miss): what serves its (token, expert)
pairs instead of the real expert, so that nothing waits for it.

Every stand-in shares one gate: a pair whose routing weight is at least `critical_weight` is critical, and its
expert stays exact (computed by the `miss_path`: copied, or computed on the host). The other misses:
- "drop": skip the pair and renormalise the token's remaining routing weights;
- "lowrank", "quant", "mixed": compute the pair with the expert's resident stand-in (low-rank factors or quantized
  weights, `bank.StandinBank`);
- "lowbit": HOBBIT: copy the expert's low-bit copy (kept on the host) in now, bits/16 of its bf16 bytes, and compute
  the pair with it;
- "buddy": BuddyMoE's three checks (token entropy, fraction of missing experts, per-token cap), then run the pair on
  the first resident expert of the missing one's buddy list that the token does not already use.
The real expert of every substituted pair is still copied in, in the background, for the following tokens.
The class names say what serves the pair; `standins.kinds` maps each `standin=` name to one of them.
"""

from __future__ import annotations

import math

import torch

from offload_moe.runtime.miss import LayerCall, MissPlan, StandinPolicy
from offload_moe.standins.bank import Fetch, StandinBank


def _isin(index: torch.Tensor, experts: set[int]) -> torch.Tensor:
    return torch.isin(index, torch.tensor(sorted(experts), dtype=index.dtype, device=index.device))


class Drop(StandinPolicy):
    """Each non-critical missed pair is skipped and the token's other routing weights renormalised."""

    def plan(self, call: LayerCall) -> MissPlan:
        index, weights = call.index, call.weights
        miss = _isin(index, call.missing)  # [T, K]
        fetch = self._critical(index, weights, miss)
        lost = miss.all(-1)  # a token keeps at least one real expert: its top one
        if lost.any():
            top = weights[lost].argmax(-1, keepdim=True)
            fetch |= set(index[lost].gather(-1, top).flatten().tolist())
        dropped = miss & ~_isin(index, fetch) if fetch else miss
        w = weights.masked_fill(dropped, 0)
        w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
        return MissPlan(index, w, fetch, substituted=int(dropped.sum()))


class Substitute(StandinPolicy):
    """Each non-critical missed pair runs on its expert's stand-in: resident, or (`fetch` given: HOBBIT's low-bit
    copies, kept on the host) copied in for this call."""

    def __init__(self, critical_weight: float, bank: StandinBank, fetch: Fetch | None = None):
        super().__init__(critical_weight)
        self.bank, self.fetch = bank, fetch

    def plan(self, call: LayerCall) -> MissPlan:
        index, weights, hidden = call.index, call.weights, call.hidden
        miss = _isin(index, call.missing)
        fetch = self._critical(index, weights, miss)
        sub = miss & ~_isin(index, fetch) if fetch else miss  # [T, K]
        extra = torch.zeros_like(hidden)  # [T, H]
        for e in sorted(set(index[sub].tolist())):
            tok, pos = torch.nonzero(sub & (index == e), as_tuple=True)
            y = self.bank.apply(call.layer, e, hidden[tok], weights[tok, pos], self.fetch)
            extra.index_add_(0, tok, y.to(hidden.dtype))
        return MissPlan(index, weights.masked_fill(sub, 0), fetch, extra, int(sub.sum()))


class Buddy(StandinPolicy):
    """BuddyMoE. buddies: [L, E, Kmax] expert ids (-1 padded), best first; tau: [L] entropy thresholds."""

    def __init__(
        self,
        critical_weight: float,
        buddies: torch.Tensor,
        tau: torch.Tensor,
        beta: float = 0.75,
        rho: int = 1,
        horizon: int = 4,
    ):
        super().__init__(critical_weight)
        self.buddies, self.tau = buddies.tolist(), tau.tolist()
        self.beta, self.rho, self.horizon = beta, rho, horizon

    def plan(self, call: LayerCall) -> MissPlan:
        index, weights, layer, missing = call.index, call.weights, call.layer, call.missing
        if len(missing) / len(call.needed) >= self.beta:  # too many substitutions would compound errors: load on demand
            return MissPlan(index, weights, set(missing))
        k = index.shape[-1]
        p = weights.float().clamp_min(1e-12)
        tae = (-(p * p.log()).sum(-1) / math.log(k)).tolist() if k > 1 else [0.0] * index.shape[0]  # [T]
        idx, w = index.tolist(), weights.tolist()
        new = [row[:] for row in idx]
        fetch: set[int] = set()
        subs = 0
        for t, row in enumerate(idx):
            used = set(row)
            n_sub = 0
            for j, e in enumerate(row):
                if e not in missing:
                    continue
                ok = tae[t] > self.tau[layer] and w[t][j] < self.critical_weight and n_sub < self.rho
                buddy = (
                    next(
                        (
                            b
                            for b in self.buddies[layer][e][: self.horizon]
                            if b >= 0 and b in call.resident and b not in used
                        ),
                        None,
                    )
                    if ok
                    else None
                )
                if buddy is None:
                    fetch.add(e)
                else:
                    new[t][j] = buddy
                    used.add(buddy)
                    n_sub += 1
                    subs += 1
        remapped = torch.tensor(new, dtype=index.dtype, device=index.device)
        return MissPlan(remapped, weights, fetch, substituted=subs)
