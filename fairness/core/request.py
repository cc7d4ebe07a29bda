"""Requests: what a client sends (`Request`, which also carries the true output length for the simulator only) and
what a scheduler may see of it (`RequestInfo`, known at arrival)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    """One LLM request of a workload. `output_tokens` is the truth, used by the simulator to know when it ends."""

    client: str
    arrival_s: float
    input_tokens: int
    output_tokens: int
    max_output_tokens: int | None = None  # a request parameter the engine knows (caps generation)
    weight: float = 1.0  # the client's share (weighted fairness)

    def __post_init__(self) -> None:
        if self.input_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"request of {self.client!r} needs input_tokens >= 1 and output_tokens >= 1")
        if self.arrival_s < 0:
            raise ValueError(f"request of {self.client!r} arrives at a negative time {self.arrival_s}")
        if self.weight <= 0:
            raise ValueError(f"client {self.client!r} has weight {self.weight}; weights must be > 0")


@dataclass(frozen=True)
class RequestInfo:
    """What an engine (and so a policy) knows about a request at decision time: never its true output length."""

    id: int
    client: str
    arrival_s: float
    input_tokens: int
    max_output_tokens: int | None
    weight: float


def estimate_tokens(text: str) -> int:
    """Rough token count of English text where only text is known (traces, a gateway's prompts): 1 token per 4
    characters."""
    return max(1, round(len(text) / 4))
