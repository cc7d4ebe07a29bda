"""The MoE blocks offload-moe drives, or an `UnsupportedModelError` that says why a model has none."""

from __future__ import annotations

import torch

from hooks import MoEBlock, find_moe_blocks

from .errors import UnsupportedModelError
from .plan import ExpertGeometry


def moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """The model's MoE blocks, checked to share one expert layout; `UnsupportedModelError` otherwise."""
    blocks = find_moe_blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no supported MoE block: offload-moe needs transformers>=5 MoE models whose "
            "experts are stacked per-expert tensors (gate_up_proj, down_proj), such as Mixtral, Qwen2-MoE, "
            "Qwen3-MoE or OLMoE"
        )
    names = blocks[0].expert_param_names()
    if any(b.expert_param_names() != names for b in blocks):
        raise UnsupportedModelError(f"{type(model).__name__}: MoE layers have different expert parameter names")
    if any(b.top_k is None for b in blocks):
        raise UnsupportedModelError(f"{type(model).__name__}: a MoE block does not state its top_k")
    return blocks


def expert_geometry(blocks: list[MoEBlock]) -> ExpertGeometry:
    """Shapes and sizes of the experts of `blocks`, which must all be alike (one pool serves them all)."""
    names = blocks[0].expert_param_names()
    first = blocks[0].experts
    shapes = {n: tuple(getattr(first, n).shape[1:]) for n in names}
    for b in blocks:
        got = {n: tuple(getattr(b.experts, n).shape[1:]) for n in names}
        if got != shapes or b.num_experts != blocks[0].num_experts:
            raise UnsupportedModelError(
                f"MoE block {b.name} has {b.num_experts} experts of shapes {got}, the first has "
                f"{blocks[0].num_experts} of {shapes}: offload-moe shares one slot pool across layers and needs "
                "every layer's experts to have the same shapes"
            )
    itemsize = getattr(first, names[0]).element_size()
    return ExpertGeometry(len(blocks), blocks[0].num_experts, max(b.top_k for b in blocks), shapes, itemsize)
