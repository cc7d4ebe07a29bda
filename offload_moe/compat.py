"""Every private torch / transformers internal offload_moe touches, in one place, each with a check that says clearly
when the installed version no longer has it. Tested against torch 2.13 and transformers 5.24 (pyproject's range)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import NamedTuple

import torch
import transformers
from transformers.integrations import moe as transformers_moe

from hooks.versions import require, require_release

TESTED = "torch 2.13, transformers 5.24"
require_release("transformers", transformers.__version__, "5.24", "offload")


def _require(ok: bool, what: str) -> None:
    require(ok, what, f"torch {torch.__version__} / transformers {transformers.__version__}", "offload_moe", TESTED)


# --- nn.Module parameters: the slot pool is swapped into a stock experts module for one kernel call ---------------


def parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's own parameter table (mutable: assigning a name here bypasses nn.Module's checks)."""
    _require(isinstance(getattr(module, "_parameters", None), dict), "nn.Module._parameters")
    return module._parameters


def own_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> None:
    """Give `module` a parameter table of its own, `params` (a shallow copy of a module shares its original's)."""
    parameters(module)  # refuses a version that keeps the table elsewhere
    module._parameters = params


def swap_parameters(module: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Put `params` in place of the module's parameters of those names; returns the ones they replaced."""
    table = parameters(module)
    saved = {n: table[n] for n in params}
    table.update(params)
    return saved


def point_experts(
    module: torch.nn.Module, params: dict[str, torch.Tensor], num_experts: int, expert_parallel: bool
) -> tuple:
    """Point a stock experts module at `params` (a window of the slot pool) holding `num_experts` experts, the
    kernels skipping sentinel ids when `expert_parallel`; returns what `restore_experts` puts back. Plain attributes
    are written to the instance dict (what nn.Module.__setattr__ does for them, without its checks: this runs per
    kernel call)."""
    table, attrs = parameters(module), module.__dict__
    saved = ({n: table[n] for n in params}, attrs["num_experts"], attrs.get("_is_expert_parallel", False))
    table.update(params)
    attrs["num_experts"], attrs["_is_expert_parallel"] = num_experts, expert_parallel
    return saved


def restore_experts(module: torch.nn.Module, saved: tuple) -> None:
    params, num_experts, expert_parallel = saved
    parameters(module).update(params)
    module.__dict__["num_experts"], module.__dict__["_is_expert_parallel"] = num_experts, expert_parallel


# --- transformers' experts kernels ----------------------------------------------------------------------------------


def set_expert_parallel(module: torch.nn.Module, on: bool) -> bool:
    """Make the stock kernels (batched_mm, grouped_mm) skip out-of-range (sentinel) expert ids, as they do for expert
    parallelism; returns the previous setting. tests/test_compat.py checks the kernels still honour it."""
    was = bool(getattr(module, "_is_expert_parallel", False))
    module._is_expert_parallel = on
    return was


# A kernel pass that skips some pairs (sentinel ids) runs over at least this many slots: with one, grouped_mm's histc
# gets min == max == 0 and bins over the ids' own range, sentinels included, so their rows join expert 0's group
# (masked afterwards, but the group's GEMM then has other rows than the unpatched call's, and rounds differently).
MASKED_WINDOW = 2


def casts_input(module: torch.nn.Module) -> bool:
    """Whether the module's experts kernel casts the hidden states to the weights' dtype before multiplying
    (transformers' grouped_mm does), so it accepts them in a wider dtype and then returns its sum of weighted
    products in that dtype, unrounded. tests/test_compat.py checks the kernel still does."""
    config = getattr(module, "config", None)
    return getattr(config, "_experts_implementation", None) == "grouped_mm"


class ExpertLayout(NamedTuple):
    """What transformers' `use_experts_implementation` declares of an experts module's math."""

    has_gate: bool
    has_bias: bool
    is_transposed: bool
    has_post_expert_norm: bool


def expert_layout(module: torch.nn.Module) -> ExpertLayout | None:
    """The module's declared layout, or None where it declares none (a custom experts class: its own forward is
    the only description of its math)."""
    attrs = module.__dict__
    names = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm")
    if not all(isinstance(attrs.get(n), bool) for n in names) or not callable(getattr(module, "_apply_gate", None)):
        return None
    return ExpertLayout(*(attrs[n] for n in names))


def gate_function(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's `_apply_gate` (its gate-up output [n, 2I] to the activated [n, I]). Where that is transformers'
    default (chunk, activation, product), the same three ops with the activation's forward called directly: the
    same math without a module call's dispatch, which on a decode's one-row inputs costs more than the ops do."""
    gate = module._apply_gate
    default = getattr(transformers_moe, "_default_apply_gate", None)  # None: an unknown version keeps the module's
    if (
        default is None
        or getattr(gate, "__func__", None) is not default
        or not isinstance(module.act_fn, torch.nn.Module)
    ):
        return gate
    act = module.act_fn.forward

    def apply(gate_up: torch.Tensor) -> torch.Tensor:
        g, up = gate_up.chunk(2, dim=-1)
        return act(g) * up

    return apply


# --- torch's CPU kernels for weight-only low-bit matrices (host_precision) ------------------------------------------


INT8_IN_MULTIPLE = 16  # torch's int8 CPU kernel reads inputs in blocks of 16: other widths give garbage or crash


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ (q [out, in] int8 * scale [out]).T: torch's weight-only int8 kernel (in: a multiple of
    INT8_IN_MULTIPLE; pad with zeros)."""
    op = getattr(torch, "_weight_int8pack_mm", None)
    _require(op is not None, "torch._weight_int8pack_mm")
    if q.shape[1] % INT8_IN_MULTIPLE:
        raise ValueError(f"int8_matmul needs an input width that is a multiple of {INT8_IN_MULTIPLE}, got {q.shape[1]}")
    return op(x, q, scale)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """int4 codes [out, in] (int32 in 0..15) packed as torch's CPU int4 kernel reads them."""
    op = getattr(torch, "_convert_weight_to_int4pack_for_cpu", None)
    _require(op is not None, "torch._convert_weight_to_int4pack_for_cpu")
    return op(q, 2)


def int4_matmul(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ dequantized(packed).T, each group of `group` inputs of a row dequantized as
    (q - 8) * scale + zero (scales_and_zeros [in / group, out, 2]): torch's CPU int4 kernel."""
    op = getattr(torch, "_weight_int4pack_mm_for_cpu", None)
    _require(op is not None, "torch._weight_int4pack_mm_for_cpu")
    return op(x, packed, group, scales_and_zeros)


def init_weights(model: torch.nn.Module, module: torch.nn.Module) -> None:
    """transformers' own initialiser for `module` (rebuilds non-persistent buffers such as rotary frequencies)."""
    _require(callable(getattr(model, "_init_weights", None)), "PreTrainedModel._init_weights")
    model._init_weights(module)


# --- transformers' continuous batching ---------------------------------------------------------------------------


def is_paged_cache(cache: object) -> bool:
    """Whether a forward's `cache` is continuous batching's paged KV cache (its attention never enters a graph)."""
    try:
        from transformers.generation.continuous_batching.cache import PagedAttentionCache
    except ImportError as e:
        _require(False, f"transformers.generation.continuous_batching.cache.PagedAttentionCache ({e})")
    return isinstance(cache, PagedAttentionCache)


# --- torch.compile ----------------------------------------------------------------------------------------------------


def mark_static_address(t: torch.Tensor) -> None:
    """Tell dynamo `t` keeps its address (a compiled graph, under CUDA graphs too, may update it in place)."""
    _require(callable(getattr(torch._dynamo, "mark_static_address", None)), "torch._dynamo.mark_static_address")
    torch._dynamo.mark_static_address(t)


def cudagraph_unsafe_tags() -> tuple:
    """The custom-op tags that keep an op out of CUDA graphs (its decisions need the host at every call)."""
    tag = getattr(getattr(torch._C, "Tag", None), "cudagraph_unsafe", None)
    _require(tag is not None, "torch._C.Tag.cudagraph_unsafe")
    return (tag,)


def own_code(fn: Callable) -> Callable:
    """A copy of `fn` with a code object of its own. Dynamo keeps compiled graphs per code object and falls back to
    eager after `recompile_limit` (8) of them: compiling `model.forward` itself would share that budget with every
    other compile of the same class in the process (a bench patching one model 9 times silently runs eager)."""
    code = fn.__code__.replace()
    _require(code is not fn.__code__, "code.replace() returning a new code object")
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
