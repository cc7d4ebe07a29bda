"""The runtime's shared vocabulary types."""

from __future__ import annotations

ExpertKey = tuple[int, int]  # (MoE layer, expert): the one key of every per-expert table
