"""Two properties of a model's routing that bound what offloading can do: the residency cache's hit rate against the
budget (LRU, beside the offline optimum of any eviction policy and the best static placement in hindsight), and how
well router lookahead predicts the experts of the layers ahead."""

from __future__ import annotations

import math
from collections import Counter

import torch

from hooks import find_moe_blocks
from offload_moe.patch import patch
from tests.measure import bits_per_byte


def hit_rate_vs_budget(model, tokenizer, text: str, budgets: tuple[float, ...]) -> list[dict]:
    """Decode `text` one token at a time with an LRU cache at each budget (copies on this device, no emulation:
    hit rates do not depend on timing); the hit rate overall and its range over layers. Beside it, from the same
    routing: `optimal_hit_rate` (Belady's offline optimum, the ceiling of any eviction policy without prefetching),
    `optimal_bypass_hit_rate` (the same when a miss may be computed on the host instead of admitted: the ceiling of
    `miss_path="auto"` and "host") and `static_hit_rate` (the `slots` experts used most over the text, chosen in
    hindsight: the ceiling of a static placement such as kTransformers')."""
    trace = routing_trace(model, tokenizer, text)
    out = []
    for budget in budgets:
        handle = patch(model, budget=budget, device="cpu", miss_path="fetch", prefetch=None)
        try:
            bits_per_byte(model, tokenizer, text, decode=True)
            s = handle.stats()
        finally:
            handle.unpatch()
        layers = [p.hit_rate for p in s.per_layer]
        out.append({"budget": budget, "slots": s.slots, "slots_per_layer": s.slots / len(layers),
                    "hit_rate": s.hit_rate, "layer_min": min(layers), "layer_max": max(layers),
                    "optimal_hit_rate": optimal_hit_rate(trace, s.slots),
                    "optimal_bypass_hit_rate": optimal_hit_rate(trace, s.slots, bypass=True),
                    "static_hit_rate": static_hit_rate(trace, s.slots)})  # fmt: skip
    return out


@torch.no_grad()
def routing_trace(model, tokenizer, text: str) -> list[tuple[int, list[int]]]:
    """(layer, distinct experts it routes to) of every experts call while decoding `text` one token at a time."""
    trace: list[tuple[int, list[int]]] = []
    handles = [b.experts.register_forward_pre_hook(lambda m, a, i=b.index: trace.append((i, a[1].unique().tolist())))
               for b in find_moe_blocks(model)]  # fmt: skip
    try:
        bits_per_byte(model, tokenizer, text, decode=True)
    finally:
        for h in handles:
            h.remove()
    return trace


def optimal_hit_rate(trace: list[tuple[int, list[int]]], slots: int, bypass: bool = False) -> float:
    """Belady: on a miss, evict the resident expert needed again furthest in the future (never one of this call).
    bypass: a missed expert may also be computed where it is (the host) and not admitted, when it is needed again
    later than every resident one (the ceiling of a cache with host compute). The slots start filled with the first
    experts the trace needs, free (no warm start does better)."""
    next_use: list[dict[tuple[int, int], float]] = [{} for _ in trace]  # call -> key -> its next call
    later: dict[tuple[int, int], float] = {}
    for c in range(len(trace) - 1, -1, -1):
        layer, experts = trace[c]
        for e in experts:
            next_use[c][(layer, e)] = later.get((layer, e), math.inf)
            later[(layer, e)] = c
    resident: dict[tuple[int, int], float] = {}  # key -> its next use
    hits = total = 0
    for c, (layer, experts) in enumerate(trace):
        keys = [(layer, e) for e in experts]
        for key in keys:
            total += 1
            if key in resident or len(resident) < slots:
                hits += 1
                resident[key] = next_use[c][key]
                continue
            victim = max((k for k in resident if k not in keys or bypass), key=resident.__getitem__)
            if bypass and resident[victim] <= next_use[c][key]:
                continue  # computed on the host, not admitted
            del resident[victim]
            resident[key] = next_use[c][key]
    return hits / max(total, 1)


def static_hit_rate(trace: list[tuple[int, list[int]]], slots: int) -> float:
    """The share of expert uses served by the `slots` experts used most over the whole trace."""
    uses = Counter((layer, e) for layer, experts in trace for e in experts)
    return sum(n for _, n in uses.most_common(slots)) / max(sum(uses.values()), 1)


@torch.no_grad()
def lookahead_recall(model, tokenizer, text: str, depths: tuple[int, ...] = (1, 2, 3), candidates: int = 1) -> dict:
    """For each depth d: of the experts layer L+d really routes each token to, the share among the `candidates`
    experts that layer L+d's router picks from layer L's residual stream (averaged over the call's tokens, as the
    prefetcher does), and the same with top-k candidates per token."""
    blocks = find_moe_blocks(model)
    residual: dict[int, torch.Tensor] = {}
    routed: dict[int, torch.Tensor] = {}
    handles = [b.norm.register_forward_pre_hook(lambda m, a, i=b.index: residual.__setitem__(i, a[0]))
               for b in blocks if b.norm is not None]  # fmt: skip
    handles += [b.experts.register_forward_pre_hook(lambda m, a, i=b.index: routed.__setitem__(i, a[1]))
                for b in blocks]  # fmt: skip
    hits = {d: [0, 0] for d in depths}  # d -> [predicted experts needed, experts needed] (averaged prediction)
    per_token = {d: [0, 0] for d in depths}  # ... with the router's top-k for each token
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    try:
        for t in range(ids.shape[1]):
            residual.clear()
            routed.clear()
            model(input_ids=ids[:, : t + 1])
            for layer, x in residual.items():
                for d in depths:
                    j = layer + d
                    if j >= len(blocks) or j not in routed:
                        continue
                    b = blocks[j]
                    h = b.norm.forward(x[:, -1:])  # the last token: the one being decoded
                    out = b.router.forward(h.reshape(-1, h.shape[-1]))
                    logits = (out[0] if isinstance(out, tuple) else out).reshape(-1, b.num_experts)  # [1, E]
                    need = set(routed[j].reshape(-1, routed[j].shape[-1])[-1].tolist())
                    avg = set(logits.float().softmax(-1).mean(0).topk(candidates).indices.tolist())
                    top = set(logits[-1].topk(len(need)).indices.tolist())
                    hits[d][0] += len(need & avg)
                    per_token[d][0] += len(need & top)
                    hits[d][1] += len(need)
                    per_token[d][1] += len(need)
    finally:
        for h in handles:
            h.remove()
    return {d: {"recall_candidates": hits[d][0] / max(hits[d][1], 1), "candidates": candidates,
                "recall_top_k": per_token[d][0] / max(per_token[d][1], 1)} for d in depths}  # fmt: skip
