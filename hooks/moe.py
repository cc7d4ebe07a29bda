"""Find the Mixture-of-Experts blocks of a transformers model whose experts use the fused 3-D layout.

Supported: any experts module registered through transformers' `ExpertsInterface` layout, i.e. a module with
`num_experts` and 3-D parameters `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], called as
`experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K])` by a block whose `gate` router returns
`(logits, top_k_weights, top_k_index)`. Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE are tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class UnsupportedModelError(TypeError):
    """The model has no MoE block in the fused-experts layout that offload-moe drives."""


@dataclass
class MoEBlock:
    """One MoE layer: where its experts, router and the norm feeding the router live."""

    index: int  # 0-based among the model's MoE blocks, in forward order
    name: str  # qualified name of the block, e.g. "model.layers.3.mlp"
    block: torch.nn.Module
    router: torch.nn.Module  # returns (logits [T, E], top_k_weights [T, K], top_k_index [T, K])
    experts: torch.nn.Module
    norm: torch.nn.Module | None  # the norm applied to the residual stream before this block (for lookahead)
    num_experts: int
    top_k: int

    def expert_param_names(self) -> list[str]:
        """Names of the experts module's per-expert parameters (first dimension = num_experts)."""
        return [
            n
            for n, p in self.experts.named_parameters(recurse=False)
            if p.dim() >= 2 and p.shape[0] == self.num_experts
        ]


def _is_fused_experts(module: torch.nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    n = getattr(module, "num_experts", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and isinstance(n, int)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == n == down.shape[0]
    )


def find_moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """All MoE blocks of `model` in forward order; raises `UnsupportedModelError` naming the class if there are none."""
    modules = dict(model.named_modules())
    blocks: list[MoEBlock] = []
    for name, module in modules.items():
        experts = getattr(module, "experts", None)
        router = getattr(module, "gate", None)
        if experts is None or router is None or not _is_fused_experts(experts):
            continue
        parent_name = name.rsplit(".", 1)[0] if "." in name else ""
        parent = modules.get(parent_name)
        norm = getattr(parent, "post_attention_layernorm", None) if parent is not None else None
        top_k = getattr(router, "top_k", None) or getattr(module, "top_k", None)
        if top_k is None:
            raise UnsupportedModelError(f"MoE block {name} ({type(module).__name__}) has no top_k on its router")
        blocks.append(MoEBlock(len(blocks), name, module, router, experts, norm, experts.num_experts, int(top_k)))
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no supported MoE block: offload-moe needs transformers>=5 MoE models whose "
            "experts are fused 3-D tensors (gate_up_proj, down_proj), such as Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE"
        )
    return blocks
