"""Two properties of a model's routing that bound what offloading can do: the residency cache's hit rate against the
budget (LRU, nothing else), and how well router lookahead predicts the experts of the layers ahead."""

from __future__ import annotations

import torch

from hooks import find_moe_blocks
from lab.evaluate import bits_per_byte
from offload_moe.patch import patch


def hit_rate_vs_budget(model, tokenizer, text: str, budgets: tuple[float, ...]) -> list[dict]:
    """Decode `text` one token at a time with an LRU cache at each budget (copies on this device, no emulation:
    hit rates do not depend on timing); the hit rate overall and its range over layers."""
    out = []
    for budget in budgets:
        handle = patch(model, budget=budget, device="cpu", fallback="fetch", prefetch=None)
        try:
            bits_per_byte(model, tokenizer, text, decode=True)
            s = handle.stats()
        finally:
            handle.unpatch()
        layers = [p.hit_rate for p in s.per_layer]
        out.append({"budget": budget, "slots": s.slots, "slots_per_layer": s.slots / len(layers),
                    "hit_rate": s.hit_rate, "layer_min": min(layers), "layer_max": max(layers)})  # fmt: skip
    return out


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
