"""One expert at a time through its experts module's own kernel: the one-expert twin of a stacked experts module,
and the call that runs it on any weights (host copies, dequantised stand-ins), in the dtype this CPU computes
fastest."""

from __future__ import annotations

import copy
import functools

import torch

from offload_moe import compat

NATIVE_FEW_TOKENS = 8  # up to this many tokens a non-native dtype is computed as is: a GEMV is memory bound


@functools.cache
def native_dtypes() -> frozenset[torch.dtype]:
    """Dtypes this CPU multiplies in hardware: float32 always, bf16 / fp16 with AVX512 or AMX support."""
    try:
        flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    out = {torch.float32, torch.float64}
    if {"avx512_bf16", "amx_bf16"} & set(flags):
        out.add(torch.bfloat16)
    if {"avx512_fp16", "amx_fp16"} & set(flags):
        out.add(torch.float16)
    return frozenset(out)


def one_expert_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of an experts module that holds one expert and runs its class's forward (no hooks)."""
    twin = copy.copy(module)
    twin.__dict__.pop("forward", None)  # the class's forward, not a hook's wrapper
    twin._parameters = dict(compat.parameters(module))
    twin.num_experts = 1
    compat.set_expert_parallel(twin, False)
    return twin


def expert_forward(
    twin: torch.nn.Module, names: list[str], weights: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """w[:, None] * expert(x) for one expert whose weights are `weights[name]` (one expert's slice of each stacked
    weight), computed by the experts module's own kernel on its one-expert `twin`: [n, H] in x's dtype."""
    dtype = next(iter(weights.values())).dtype
    if dtype not in native_dtypes() and x.shape[0] > NATIVE_FEW_TOKENS:
        dtype = torch.float32  # measured on AVX2: fp32 2x faster than bf16 at 32 tokens, conversion included
    call = copy.copy(twin)  # per call: workers run concurrently
    call._parameters = {**twin._parameters}
    for n in names:
        call._parameters[n] = torch.nn.Parameter(weights[n].to(dtype).unsqueeze(0), requires_grad=False)
    index = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
    with torch.no_grad():  # the class's forward, called directly: forward hooks on the module do not fire
        y = type(twin).forward(call, x.to(dtype), index, w[:, None].to(dtype))
    return y.to(x.dtype)
