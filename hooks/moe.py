"""Find the Mixture-of-Experts blocks of a transformers model whose experts are stacked per-expert tensors.

A block is a module with an `experts` child and a router child (`gate` or `router`). The experts module holds
`num_experts` and parameters whose first dimension is the expert (transformers' `ExpertsInterface` layout:
`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I], optional biases [E, ...]) and is called as
`experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])`. What to do with a model that has none is
the caller's decision: `find_moe_blocks` returns an empty list.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROUTER_NAMES = ("gate", "router")
NORM_NAMES = ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm")


@dataclass
class MoEBlock:
    """One MoE layer: where its experts, router and the norm feeding the router live."""

    index: int  # 0-based among the model's MoE blocks, in forward order
    name: str  # qualified name of the block, e.g. "model.layers.3.mlp"
    block: torch.nn.Module
    router: torch.nn.Module
    experts: torch.nn.Module
    norm: torch.nn.Module | None  # the norm applied to the residual stream before this block, if found
    num_experts: int
    top_k: int | None  # experts per token, when the router or block states it

    def expert_param_names(self) -> list[str]:
        """Names of the experts module's per-expert parameters (first dimension = num_experts), in module order."""
        return [
            n
            for n, p in self.experts.named_parameters(recurse=False)
            if p.dim() >= 2 and p.shape[0] == self.num_experts
        ]

    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each per-expert parameter's shape for one expert (without the expert dimension), by name."""
        return {n: tuple(getattr(self.experts, n).shape[1:]) for n in self.expert_param_names()}


def is_stacked_experts(module: torch.nn.Module) -> bool:
    """An experts module whose weights are stacked per expert: `num_experts` and at least one [E, ...] parameter."""
    n = getattr(module, "num_experts", None)
    if not isinstance(n, int) or n < 1:
        return False
    return any(p.dim() >= 2 and p.shape[0] == n for p in module.parameters(recurse=False))


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """All MoE blocks of `model` in forward (module registration) order; empty when there are none."""
    modules = dict(model.named_modules())
    blocks: list[MoEBlock] = []
    for name, module in modules.items():
        experts = getattr(module, "experts", None)
        routers = (getattr(module, n, None) for n in ROUTER_NAMES)
        router = next((r for r in routers if isinstance(r, torch.nn.Module)), None)
        if not isinstance(experts, torch.nn.Module) or router is None or not is_stacked_experts(experts):
            continue
        parent = modules.get(name.rsplit(".", 1)[0] if "." in name else "")
        norm = next((getattr(parent, n) for n in NORM_NAMES if parent is not None and hasattr(parent, n)), None)
        top_k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
        blocks.append(
            MoEBlock(
                len(blocks), name, module, router, experts, norm, experts.num_experts, int(top_k) if top_k else None
            )
        )
    return blocks
