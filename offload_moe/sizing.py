"""`budget="auto"` and `ram_budget="auto"`: what the device and the host have free now, less what else will live
there (the model's other weights, the KV cache for the context and batch the user names, a margin), as bytes a plan
can be made from. Every number the choice was made from is kept, so a refusal and `offload_moe.fit` can show it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hooks import MoEBlock
from offload_moe import compat
from offload_moe.budget import available_host_bytes, budget_bytes, format_bytes, free_device_bytes
from offload_moe.errors import BudgetError
from offload_moe.geometry import ExpertGeometry
from offload_moe.options import OffloadOptions

AUTO = "auto"


@dataclass(frozen=True)
class DeviceRoom:
    """What an "auto" budget was computed from, in bytes: `free` on the device now, less the model's other weights
    that will move there (`others`), the KV cache (`kv`) and the `margin`, leaves `experts` (never above every
    expert's bytes)."""

    device: str
    free: int
    others: int
    kv: int
    margin: int
    all_experts: int

    @property
    def experts(self) -> int:
        return max(0, min(self.free - self.others - self.kv - self.margin, self.all_experts))

    def describe(self) -> str:
        return (
            f"{format_bytes(self.free)} free on {self.device} - {format_bytes(self.others)} of other weights - "
            f"{format_bytes(self.kv)} of KV cache - {format_bytes(self.margin)} margin = "
            f"{format_bytes(self.experts)} for experts"
        )


def kv_cache_bytes(config: object, dtype: torch.dtype, tokens: int, batch: int) -> int:
    """Bytes of a full-attention KV cache of `tokens` positions for `batch` sequences, every layer (sliding-window
    layers counted in full: an upper bound). Multi-head latent attention (DeepSeek) caches its compressed key-value
    and its shared rotary key, one of each per position, as transformers' cache holds them."""
    text = getattr(config, "text_config", None) or config
    layers = getattr(text, "num_hidden_layers", 0)
    if getattr(text, "kv_lora_rank", None) is not None:
        per_position = text.kv_lora_rank + text.qk_rope_head_dim
    else:
        heads = getattr(text, "num_attention_heads", 1)
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        per_position = 2 * kv_heads * (getattr(text, "head_dim", None) or text.hidden_size // heads)
    return layers * per_position * tokens * batch * dtype.itemsize


def non_expert_bytes(model: torch.nn.Module, blocks: list[MoEBlock], device: torch.device | None = None) -> int:
    """Bytes of the model's weights and buffers other than the experts; with `device`, of those not on it yet
    (patch moves them there)."""
    expert_ids = {id(p) for b in blocks for p in compat.parameters(b.experts).values()}
    tensors = [t for t in (*model.parameters(), *model.buffers()) if id(t) not in expert_ids]
    return sum(t.numel() * t.element_size() for t in tensors if device is None or t.device != device)


def free_for_experts(blocks: list[MoEBlock], device: torch.device) -> int | None:
    """Bytes free on `device` for patch's slots: free now, plus the experts now on an accelerator (patch moves them
    to the host first; on a CPU device the host copies are the experts themselves, so nothing is released). None
    where the free memory is not known."""
    free = free_device_bytes(device)
    if free is not None and device.type != "cpu":
        params = [p for b in blocks for p in compat.parameters(b.experts).values()]
        free += sum(p.numel() * p.element_size() for p in params if p.device == device)
    return free


def device_room(
    model: torch.nn.Module,
    blocks: list[MoEBlock],
    geometry: ExpertGeometry,
    device: torch.device,
    options: OffloadOptions,
    dtype: torch.dtype,
) -> DeviceRoom:
    """The room `budget="auto"` gives the experts on `device`. Refused (BudgetError) where the free memory is not
    known, or where it does not hold one token's working set (one layer's top-k experts)."""
    free = free_for_experts(blocks, device)
    if free is None:
        raise BudgetError(f'budget="auto" needs to know the memory free on {device}, which it cannot read; pass a size')
    room = DeviceRoom(
        str(device),
        free,
        non_expert_bytes(model, blocks, device),
        kv_cache_bytes(model.config, dtype, options.max_tokens, options.max_batch),
        options.margin_bytes(),
        geometry.total_bytes,
    )
    need = geometry.top_k * geometry.expert_bytes
    if room.experts < need:
        raise BudgetError(
            f'budget="auto": {room.describe()}, but one token needs {geometry.top_k} experts of one layer '
            f"({format_bytes(need)}); free memory on {device}, or lower max_tokens / max_batch / memory_margin"
        )
    return room


def host_room(margin: int) -> int:
    """Bytes `ram_budget="auto"` gives the RAM tier: what this process may still take (cgroup limits respected), less
    the margin."""
    left = available_host_bytes()
    if left is None:
        raise BudgetError('ram_budget="auto" needs to know the RAM available here, which it cannot read; pass a size')
    return max(0, left - margin)


def ram_tier_slots(ram_budget: float | str, one: int, every: int, device: torch.device, margin: int) -> int:
    """Experts of `one` byte each (of `every` bytes in all) a RAM tier of `ram_budget` holds. "auto": what RAM has
    left less `margin`, none on a CPU device (its budget is RAM already); a given budget that holds none is refused."""
    if ram_budget == AUTO:
        return 0 if device.type == "cpu" else min(host_room(margin), every) // one
    slots = min(budget_bytes(ram_budget, every), every) // one
    if slots < 1:
        raise ValueError(
            f"ram_budget={ram_budget!r} holds no expert (one is {one / 2**20:.1f} MiB); give at least "
            "that, or leave ram_budget unset"
        )
    return slots
