"""A small hook protocol for `torch.nn.Module`s, with symmetric attach/detach (in the spirit of accelerate's hooks).

A hook wraps one module's forward: `attach` calls `hook.init_hook(module)` and installs it, `detach` calls
`hook.detach_hook(module)` and restores the module's forward exactly as it was. Unlike torch's forward pre-hooks, a
`ModuleHook` may call the original forward more than once (for example to stream weights through a buffer in waves),
or not at all.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_HOOK_ATTR = "_module_hook"
_ORIG_FORWARD_ATTR = "_module_hook_orig_forward"


class ModuleHook:
    """Override `pre_forward` / `post_forward` for simple hooks, or `run` to control how the forward is called."""

    def init_hook(self, module: torch.nn.Module) -> None:
        """Called once by `attach`, before the hook sees a forward."""

    def detach_hook(self, module: torch.nn.Module) -> None:
        """Called once by `detach`, after the module's forward is restored."""

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def run(self, module: torch.nn.Module, forward: Callable, *args: Any, **kwargs: Any) -> Any:
        args, kwargs = self.pre_forward(module, *args, **kwargs)
        return self.post_forward(module, forward(*args, **kwargs))


def attach(module: torch.nn.Module, hook: ModuleHook) -> None:
    """Route `module`'s forward through `hook`. A module holds at most one hook: detach first to replace it."""
    if is_attached(module):
        raise RuntimeError(f"{type(module).__name__} already has a hook attached; detach it first")
    had_instance_forward = "forward" in module.__dict__
    original = module.forward
    hook.init_hook(module)

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        return hook.run(module, original, *args, **kwargs)

    setattr(module, _ORIG_FORWARD_ATTR, original if had_instance_forward else None)
    setattr(module, _HOOK_ATTR, hook)
    module.forward = forward


def detach(module: torch.nn.Module) -> ModuleHook | None:
    """Remove the hook from `module` (no-op without one) and return it; the module's forward is the original again."""
    hook = module.__dict__.get(_HOOK_ATTR)
    if hook is None:
        return None
    original = module.__dict__[_ORIG_FORWARD_ATTR]
    del module.forward
    if original is not None:  # the module had its own instance-level forward before: put it back
        module.forward = original
    delattr(module, _HOOK_ATTR)
    delattr(module, _ORIG_FORWARD_ATTR)
    hook.detach_hook(module)
    return hook


def is_attached(module: torch.nn.Module) -> bool:
    return _HOOK_ATTR in module.__dict__


def attached_hook(module: torch.nn.Module) -> ModuleHook | None:
    return module.__dict__.get(_HOOK_ATTR)
