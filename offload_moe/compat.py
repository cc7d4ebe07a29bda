"""Every private torch / transformers internal offload_moe touches, in one place, each with a check that says clearly
when the installed version no longer has it. Tested against torch 2.13 and transformers 5.24 (pyproject's range)."""

from __future__ import annotations

import types
from collections.abc import Callable

import torch

TESTED = "torch 2.13, transformers 5.24"


class IncompatibleVersionError(RuntimeError):
    """An internal offload_moe relies on is missing from the installed torch or transformers."""


def _require(ok: bool, what: str) -> None:
    if not ok:
        import transformers

        raise IncompatibleVersionError(
            f"{what}: not found in torch {torch.__version__} / transformers {transformers.__version__}; offload_moe "
            f"is tested with {TESTED}: install a version in pyproject's range"
        )


# --- nn.Module parameters: the slot pool is swapped into a stock experts module for one kernel call ---------------


def parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's own parameter table (mutable: assigning a name here bypasses nn.Module's checks)."""
    _require(isinstance(getattr(module, "_parameters", None), dict), "nn.Module._parameters")
    return module._parameters


def swap_parameters(module: torch.nn.Module, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.nn.Parameter]:
    """Put `params` in place of the module's parameters of those names; returns the ones they replaced."""
    table = parameters(module)
    saved = {n: table[n] for n in params}
    table.update(params)
    return saved


# --- transformers' experts kernels ----------------------------------------------------------------------------------


def set_expert_parallel(module: torch.nn.Module, on: bool) -> bool:
    """Make the stock kernels (batched_mm, grouped_mm) skip out-of-range (sentinel) expert ids, as they do for expert
    parallelism; returns the previous setting. tests/test_compat.py checks the kernels still honour it."""
    was = bool(getattr(module, "_is_expert_parallel", False))
    module._is_expert_parallel = on
    return was


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


def own_code(fn: Callable) -> Callable:
    """A copy of `fn` with a code object of its own. Dynamo keeps compiled graphs per code object and falls back to
    eager after `recompile_limit` (8) of them: compiling `model.forward` itself would share that budget with every
    other compile of the same class in the process (a bench patching one model 9 times silently runs eager)."""
    code = fn.__code__.replace()
    _require(code is not fn.__code__, "code.replace() returning a new code object")
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
