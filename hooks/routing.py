"""Capture the routing decisions of every MoE layer while a model runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .moe import MoEBlock, find_moe_blocks


@dataclass
class RoutingTrace:
    """Per MoE layer, the top-k expert ids [T, K] and weights [T, K] of each forward call, on the CPU."""

    index: list[list[torch.Tensor]] = field(default_factory=list)
    weights: list[list[torch.Tensor]] = field(default_factory=list)

    def layer_index(self, layer: int) -> torch.Tensor:
        """All top-k ids seen by `layer`, concatenated over calls: [sum T, K]."""
        return torch.cat(self.index[layer])


class RoutingRecorder:
    """Context manager that records (top_k_index, top_k_weights) entering each experts module.

    Uses a plain forward pre-hook, which runs before the module's `forward`: it composes with a `ModuleHook` (which
    wraps `forward`) and always sees the ids the router chose, whatever the hook does with them.
    """

    def __init__(self, model: torch.nn.Module, blocks: list[MoEBlock] | None = None):
        self.blocks = blocks if blocks is not None else find_moe_blocks(model)
        if not self.blocks:
            raise ValueError(f"{type(model).__name__} has no MoE block whose routing could be recorded")
        self.trace = RoutingTrace([[] for _ in self.blocks], [[] for _ in self.blocks])
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> RoutingTrace:
        for b in self.blocks:
            self._handles.append(b.experts.register_forward_pre_hook(self._make_hook(b.index)))
        return self.trace

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, layer: int):
        def hook(module, args):
            _, top_k_index, top_k_weights = args[:3]
            self.trace.index[layer].append(top_k_index.detach().cpu())
            self.trace.weights[layer].append(top_k_weights.detach().float().cpu())

        return hook
