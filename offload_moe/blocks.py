"""The MoE blocks offload-moe drives, or an `UnsupportedModelError` that says why a model has none."""

from __future__ import annotations

import inspect

import torch

from hooks import MoEBlock, find_moe_blocks, is_stacked_experts
from offload_moe.errors import UnsupportedModelError
from offload_moe.geometry import ExpertGeometry


def moe_blocks(model: torch.nn.Module) -> list[MoEBlock]:
    """The model's MoE blocks, checked to share one expert layout; `UnsupportedModelError` otherwise."""
    blocks = [b for b in find_moe_blocks(model) if _takes_routing(b.experts)]
    if not blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE block offload-moe can drive: {_why_not(model)}. offload-moe needs "
            "experts stacked per expert (transformers' ExpertsInterface layout) and called with the routed expert "
            "ids, as in Mixtral, Qwen-MoE, DeepSeek, gpt-oss, Granite-MoE and most transformers MoE families"
        )
    names = blocks[0].expert_param_names()
    if any(b.expert_param_names() != names for b in blocks):
        raise UnsupportedModelError(f"{type(model).__name__}: MoE layers have different expert parameter names")
    if any(b.top_k is None for b in blocks):
        raise UnsupportedModelError(f"{type(model).__name__}: a MoE block does not state its top_k")
    return blocks


def expert_geometry(blocks: list[MoEBlock], packed_bytes: int | None = None) -> ExpertGeometry:
    """Shapes and sizes of the experts of `blocks`, which must all be alike (one pool serves them all);
    packed_bytes: one expert's bytes in its checkpoint's low-bit format, where the store keeps that."""
    shapes = blocks[0].expert_shapes()
    for b in blocks:
        got = b.expert_shapes()
        if got != shapes or b.num_experts != blocks[0].num_experts:
            raise UnsupportedModelError(
                f"MoE block {b.name} has {b.num_experts} experts of shapes {got}, the first has "
                f"{blocks[0].num_experts} of {shapes}: offload-moe shares one slot pool across layers and needs "
                "every layer's experts to have the same shapes"
            )
    weight = getattr(blocks[0].experts, blocks[0].expert_param_names()[0])
    if not weight.is_floating_point() or weight.dtype.itemsize == 1:
        raise UnsupportedModelError(
            f"MoE block {blocks[0].name} holds its experts packed ({weight.dtype}), as transformers keeps a low-bit "
            "checkpoint where it has kernels for it; patch() needs them in a float dtype. Use "
            "offload_moe.load(path), which reads MXFP4, FP8 and int4/int8 checkpoints and keeps the experts packed"
        )
    top_k = max(b.top_k for b in blocks)
    return ExpertGeometry(len(blocks), blocks[0].num_experts, top_k, shapes, weight.element_size(), packed_bytes)


def _takes_routing(experts: torch.nn.Module) -> bool:
    """The experts module is called as experts(hidden_states, top_k_index, top_k_weights, ...)."""
    params = list(inspect.signature(type(experts).forward).parameters.values())[1:]  # after self
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind is p.VAR_POSITIONAL for p in params)


def _why_not(model: torch.nn.Module) -> str:
    """What is wrong with the model's experts modules, for the error message."""
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith("Experts"):
            continue
        if not is_stacked_experts(module):
            return f"{name} ({cls}) does not hold its weights stacked per expert with a num_experts count"
        if not _takes_routing(module):
            sig = inspect.signature(type(module).forward)
            return f"{name} ({cls}) is called as forward{sig}, without the routed expert ids to fetch experts by"
        return f"{name} ({cls}) has no router (gate or router) beside it in its block"
    return "no experts module found (a dense model?)"
