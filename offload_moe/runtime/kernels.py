"""One expert at a time through its experts module's own kernel: the one-expert twin of a stacked experts module,
and the call that runs it on any weights (host copies, dequantised stand-ins)."""

from __future__ import annotations

import copy

import torch

from offload_moe import compat


def one_expert_twin(module: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of an experts module that holds one expert and runs its class's forward (no hooks)."""
    twin = copy.copy(module)
    twin.__dict__.pop("forward", None)  # the class's forward, not a hook's wrapper
    compat.own_parameters(twin, dict(compat.parameters(module)))
    twin.num_experts = 1
    compat.set_expert_parallel(twin, False)
    return twin


def expert_forward(
    twin: torch.nn.Module, names: list[str], weights: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """w[:, None] * expert(x) for one expert whose weights are `weights[name]` (one expert's slice of each stacked
    weight), computed by the experts module's own kernel on its one-expert `twin`, exactly as the device computes
    it: in the weights' dtype, the routing weights w [n] as given. [n, H] in the kernel's accumulation dtype (x's
    where the kernel casts its input, so pass x in that dtype to get the sum unrounded)."""
    dtype = next(iter(weights.values())).dtype
    call = copy.copy(twin)  # per call: workers run concurrently
    one = {n: torch.nn.Parameter(weights[n].unsqueeze(0), requires_grad=False) for n in names}
    compat.own_parameters(call, {**compat.parameters(twin), **one})
    index = torch.zeros((x.shape[0], 1), dtype=torch.long, device=x.device)
    x = x if compat.casts_input(twin) else x.to(dtype)
    with torch.no_grad():  # the class's forward, called directly: forward hooks on the module do not fire
        return type(twin).forward(call, x, index, w[:, None])
