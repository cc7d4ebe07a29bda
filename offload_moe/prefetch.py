"""Router lookahead: while layer L computes, apply the routers of layers L+1..L+d (each after its own norm) to layer
L's residual stream and start copying the experts they pick, most probable first."""

from __future__ import annotations

import torch

from hooks import MoEBlock

from .cache import ExpertCache, Key


class LookaheadPrefetcher:
    """Predicts the next `depth` layers' experts from the current residual stream and queues their copies.

    `candidates` experts per predicted layer are queued (the most probable first, averaged over the call's tokens).
    Keys already resident are kept (the eviction policy holds on to what is about to be used). Nothing is queued
    while more than `max_queued` copies wait for the link: a prefetch that cannot land in time only delays others.
    Only `predictable` layers (those whose router can be applied to a residual stream) are predicted.
    """

    def __init__(
        self,
        blocks: list[MoEBlock],
        cache: ExpertCache,
        depth: int,
        candidates: int,
        predictable: set[int],
        max_queued: int = 0,
    ):
        self.blocks, self.cache, self.depth, self.candidates = blocks, cache, depth, candidates
        self.predictable, self.max_queued = predictable, max_queued
        self._residual: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [b.norm.register_forward_pre_hook(self._capture(b.index)) for b in blocks if b.norm is not None]

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
            if j not in self.predictable:
                continue
            b = self.blocks[j]
            logits = router_logits(b.router, b.norm.forward(x))  # .forward: no hooks (ours would fire)
            probs = logits.float().softmax(-1).mean(0)  # [E]
            for e in probs.topk(min(self.candidates, b.num_experts)).indices.tolist():
                key = (j, e)
                protected.add(key)
                if self.cache.is_resident(key):
                    self.cache.keep(key)
                elif self.cache.queued_copies() > self.max_queued:
                    return
                elif self.cache.load(key, protected, prefetch=True) is None:
                    return  # every slot is protected or in flight: stop for this round


def router_logits(router: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[T, E] router scores for x [T, H]: routers return either the logits or a tuple whose first item they are."""
    out = router.forward(x)
    return out[0] if isinstance(out, tuple) else out
