"""What a budget's cache would hit on a recorded routing trace: the trace's decode order (token by token, layer by
layer) replayed through the runtime's own slot table and eviction policy, with no weights and no copies. `fit` uses it
for the hit rate and for the layer calls that miss (each costs the runtime a call's bookkeeping and kernel pass on
the pool, however many experts it misses)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from offload_moe.runtime.eviction import EvictionPolicy
from offload_moe.runtime.slots import SlotTable

WARMUP_TOKENS = 64  # the trace's first tokens (at most a quarter) fill the cache, uncounted (a prompt does the same)


@dataclass(frozen=True)
class ReplayResult:
    """Per decode token after the warm-up: routed experts resident, missed, and layer calls that missed one or more."""

    hits: float
    misses: float
    missing_calls: float

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 1.0


def replay(
    routing: torch.Tensor, slots: int, num_experts: int, top_k: int, eviction: str | EvictionPolicy | type
) -> ReplayResult:
    """Replay `routing` [T, L, K] (expert ids in token order) through a slot table of `slots` slots, each call's
    misses taking free slots, then the policy's victims (never an expert of the same call), as the runtime's fetch
    does."""
    tokens, layers, _ = routing.shape
    warmup = warmup_tokens(tokens)
    table = SlotTable(layers, num_experts, slots, top_k, eviction, torch.device("cpu"))
    ids = np.sort(routing.numpy(), axis=-1)  # [T, L, K]
    hits = misses = calls = 0
    for t in range(tokens):
        counted = t >= warmup
        for layer in range(layers):
            experts = list(dict.fromkeys(ids[t, layer].tolist()))  # distinct, ascending
            table.at_layer(layer)
            present = table.slots_of(layer, experts)
            missing = [e for e, s in zip(experts, present, strict=True) if s < 0]
            table.touch_all(layer, [(layer, e) for e, s in zip(experts, present, strict=True) if s >= 0])
            if counted:
                hits += len(experts) - len(missing)
                misses += len(missing)
                calls += bool(missing)
            if missing:  # free slots, then victims (never an expert of this call), as the runtime's fetch does
                protected = {(layer, e) for e in experts}
                slots, _ = table.claim(layer, len(missing), protected.__contains__)
                for e, slot in zip(missing, slots, strict=False):  # a set smaller than the misses takes what fits
                    table.put((layer, e), slot)
    n = tokens - warmup
    return ReplayResult(hits / n, misses / n, calls / n)


def warmup_tokens(tokens: int) -> int:
    """The first tokens of a trace of `tokens` that only fill the cache."""
    return min(WARMUP_TOKENS, tokens // 4)
