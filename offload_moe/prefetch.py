"""Router lookahead: while layer L computes, apply the routers of layers L+1..L+d (each after its own norm) to layer
L's residual stream and start copying the experts they pick, most probable first."""

from __future__ import annotations

import torch

from hooks import MoEBlock

from .cache import ExpertCache, Key


class LookaheadPrefetcher:
    """Predicts the next `depth` layers' experts from the current residual stream and queues their copies.

    `candidates` experts per predicted layer are queued (the most probable first, averaged over the call's tokens).
    Keys already resident are touched, so the eviction policy keeps what is about to be used. Nothing is queued
    while more than `max_queued` copies wait for the link: a prefetch that cannot land in time only delays others.
    """

    def __init__(self, blocks: list[MoEBlock], cache: ExpertCache, depth: int, candidates: int, max_queued: int = 0):
        if depth < 1 or candidates < 1:
            raise ValueError(f"lookahead needs depth >= 1 and candidates >= 1, got {depth} and {candidates}")
        if any(b.norm is None for b in blocks):
            raise ValueError("lookahead prefetch needs each MoE block's pre-MoE norm (post_attention_layernorm)")
        self.blocks, self.cache, self.depth, self.candidates = blocks, cache, depth, candidates
        self.max_queued = max_queued
        self._residual: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [b.norm.register_forward_pre_hook(self._capture(b.index)) for b in blocks]

    def _capture(self, layer: int):
        def hook(module, args):
            self._residual[layer] = args[0]  # [B, T, H] residual stream entering this layer's MoE norm

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def run(self, layer: int, protected: set[Key]) -> None:
        """Queue copies for layers after `layer`; never evicts `protected` keys or keys chosen in this round."""
        x = self._residual[layer]
        self._residual[layer] = None
        if x is None:
            return
        x = x.reshape(-1, x.shape[-1])  # [T, H]
        protected = set(protected)
        for j in range(layer + 1, min(layer + 1 + self.depth, len(self.blocks))):
            b = self.blocks[j]
            logits = b.router.forward(b.norm.forward(x))[0]  # [T, E]; .forward: no hooks (ours would fire)
            probs = logits.float().softmax(-1).mean(0)  # [E]
            for e in probs.topk(min(self.candidates, b.num_experts)).indices.tolist():
                key = (j, e)
                protected.add(key)
                if key in self.cache.slot_of:
                    self.cache.eviction.touch(key)
                elif self.cache.engine.queued() > self.max_queued:
                    return
                elif self.cache.load(key, protected, prefetch=True) is None:
                    return  # every slot is protected or in flight: stop for this round
