"""VTC's service: what serving a request costs its client, the one formula every policy, counter and measure uses."""

from __future__ import annotations

W_P, W_Q = 1.0, 2.0  # VTC's weights of an input and an output token


def service(
    input_tokens: float, output_tokens: float, weight: float = 1.0, w_p: float = W_P, w_q: float = W_Q
) -> float:
    """(w_p x input tokens + w_q x output tokens) / the client's weight."""
    return (w_p * input_tokens + w_q * output_tokens) / weight
