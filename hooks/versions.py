"""The one error every package of this project raises when a private internal of torch or transformers it relies on
is missing from the installed version (each package fences its internals in a `compat` module)."""

from __future__ import annotations


class IncompatibleVersionError(RuntimeError):
    """An internal of torch or transformers this project relies on is missing from the installed version; the
    message names the internal and the versions it is tested with."""


def require_release(package: str, installed: str, tested: str, extra: str) -> None:
    """Refuse `installed` unless it is a release of the `tested` line ("5.24": any 5.24.x), naming the extra of
    this project that installs it: its pins differ from another engine's (vLLM pins an older transformers), so an
    environment may hold either."""
    if installed.split("+")[0].split(".")[:2] != tested.split("."):
        raise IncompatibleVersionError(
            f"{package} {installed} is installed; this part of offload-moe is tested with {package} {tested}.x: "
            f"pip install 'offload-moe[{extra}]' (in an environment of its own where another engine pins "
            f"{package} elsewhere)"
        )


def require(ok: bool, what: str, installed: str, user: str, tested: str) -> None:
    """Unless `ok`, refuse the `installed` versions: they lack `what`, a private internal that `user` (a package of
    this project) relies on and is tested with in `tested`."""
    if not ok:
        raise IncompatibleVersionError(
            f"{what}: not found in {installed}; {user} is tested with {tested}: install a version in pyproject's range"
        )
