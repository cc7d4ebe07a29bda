"""Router lookahead: while layer L computes, apply the routers of layers L+1..L+d (each after its own norm) to layer
L's residual stream and start copying the experts they pick, most probable first."""

from __future__ import annotations

import inspect
import logging

import torch

from hooks import MoEBlock
from offload_moe.runtime.cache import ExpertCache
from offload_moe.runtime.speculation import Source
from offload_moe.runtime.types import ExpertKey

log = logging.getLogger(__name__)


class LookaheadPrefetcher:
    """Predicts the next `depth` layers' experts from the current residual stream and queues their copies.

    `candidates` experts per predicted layer are queued (the most probable first, averaged over the call's tokens).
    Keys already resident are kept (the eviction policy holds on to what is about to be used). Nothing is queued
    while more than `max_queued` copies wait for the link: a prefetch that cannot land in time only delays others.
    A layer is predicted when its block has a pre-MoE norm and its router can be called on a residual stream (extra
    router arguments are taken from the block's attributes of the same name); the others are said once and skipped.
    """

    def __init__(self, blocks: list[MoEBlock], cache: ExpertCache, depth: int, candidates: int, max_queued: int = 0):
        self.blocks, self.cache, self.depth, self.candidates = blocks, cache, depth, candidates
        self.max_queued = max_queued
        self._extra: dict[int, list[str]] = {}  # layer -> block attributes passed to its router after x
        reasons = {}
        for b in blocks:
            reason = self._callable(b)
            if reason is None:
                continue
            reasons[b.name] = reason
        if reasons:
            log.warning(
                "router lookahead is off for %d MoE block(s): %s",
                len(reasons),
                "; ".join(f"{n}: {r}" for n, r in reasons.items()),
            )
        self._rank: dict[int, int] = {}  # layer -> rank of the input its router really receives
        self._residual: list[torch.Tensor | None] = [None] * len(blocks)
        self._handles = [b.norm.register_forward_pre_hook(self._capture(b.index)) for b in blocks if b.norm is not None]
        self._handles += [b.router.register_forward_pre_hook(self._learn_rank(b.index)) for b in blocks]

    def _callable(self, b: MoEBlock) -> str | None:
        """Why block b's router cannot be applied ahead of time (None: it can; its extra arguments are recorded)."""
        if b.norm is None:
            return "no pre-MoE norm found"
        params = [
            p
            for p in inspect.signature(b.router.forward).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][1:]
        missing = [p.name for p in params if not hasattr(b.block, p.name)]
        if missing:
            return f"its router needs {missing}, which the residual stream does not carry"
        self._extra[b.index] = [p.name for p in params]
        return None

    def _capture(self, layer: int):
        def hook(module, args):
            self._residual[layer] = args[0]  # [B, T, H] residual stream entering this layer's MoE norm

        return hook

    def _learn_rank(self, layer: int):
        def hook(module, args):
            self._rank[layer] = args[0].dim()

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _logits(self, j: int, x: torch.Tensor) -> torch.Tensor | None:
        """[T, E] router scores of layer j for residual x [B, T, H]; None (and no more lookahead for j) if it fails."""
        b = self.blocks[j]
        h = b.norm.forward(x)  # .forward: no hooks (ours would fire)
        if self._rank[j] == 2:
            h = h.reshape(-1, h.shape[-1])
        try:
            out = b.router.forward(h, *(getattr(b.block, n) for n in self._extra[j]))
        except Exception as e:  # a router this lookahead does not understand: prediction only, never outputs
            log.warning(
                "router lookahead is off for %s: its router failed on a residual stream (%s: %s)",
                b.name,
                type(e).__name__,
                e,
            )
            del self._extra[j]
            return None
        logits = out[0] if isinstance(out, tuple) else out
        return logits.reshape(-1, logits.shape[-1])

    def residual(self, layer: int) -> torch.Tensor | None:
        """The residual stream captured for `layer` in this forward (a compiled graph passes it on explicitly: the
        capture's store is only applied after the graph)."""
        return self._residual[layer]

    @torch.no_grad()
    def run(self, layer: int, protected: set[ExpertKey], residual: torch.Tensor | None = None) -> None:
        """Queue copies for layers after `layer`; never evicts `protected` keys or keys chosen in this round.
        residual: layer's residual stream [B, T, H] (default: the one captured in this forward)."""
        x = self._residual[layer] if residual is None else residual
        self._residual[layer] = None
        if x is None:
            return
        protected = set(protected)
        for j in range(layer + 1, min(layer + 1 + self.depth, len(self.blocks))):
            if j not in self._extra or j not in self._rank:  # the rank is learned at the router's first real call
                continue
            if not self.cache.wants_suggestions(Source.LOOKAHEAD, j):  # it does not pay at j: predict only to judge
                continue
            b = self.blocks[j]
            logits = self._logits(j, x)
            if logits is None:
                continue
            probs = logits.float().softmax(-1).mean(0)  # [E]
            keys = [(j, e) for e in probs.topk(min(self.candidates, b.num_experts)).indices.tolist()]
            if not self.cache.speculate(keys, protected, Source.LOOKAHEAD, self.max_queued):
                return  # the link's queue is full, or every slot is protected or in flight: stop for this round
            protected.update(keys)
