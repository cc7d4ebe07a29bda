"""VTC's fairness guarantee as a number: the most two backlogged clients' service may differ under VTC."""

from __future__ import annotations

from collections.abc import Sequence

from fairness.core.request import Request
from fairness.core.service import W_P, W_Q


def vtc_bound(requests: Sequence[Request], kv_tokens: int) -> float:
    """2U, with U = max(w_p x longest input, w_q x M) / smallest client weight and M the most tokens a batch holds
    (the KV pool): Sheng et al., OSDI 2024, Theorem 4.4 (with weights, Section 4.3)."""
    u = max(W_P * max(r.input_tokens for r in requests), W_Q * kv_tokens)
    return 2 * u / min(r.weight for r in requests)
