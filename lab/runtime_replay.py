"""The offload runtime alone: routing traces recorded from the DeepSeek-V3-shaped model (`tests.scale_models`, with
its default routing and with spread routing, where most expert uses are misses) replayed through the real hooks of a
model that has nothing but MoE layers of tiny experts (256 per layer, a quarter of them resident), from 16 to 234
layers: pools of 1,024 to 14,976 slots that all see the same routing per layer, so the same hit rate. What a layer
call and a miss cost the runtime itself, and whether that grows with the pool: nothing else runs."""

from __future__ import annotations

import time

import torch

from hooks import RoutingRecorder
from offload_moe.patch import patch
from tests.scale_models import VOCAB, scale_model, spread_routing

LAYERS = (16, 32, 64, 128, 234)  # x 256 experts x 1/4: 1,024 to 14,976 slots
BUDGET = 0.25
TRACE_TOKENS = 96  # prompt tokens whose routing is recorded
WARM_STEPS = 16  # tokens replayed through every layer before the timed calls
REPLAY_CALLS = 2000  # layer calls timed per pool size


class TinyExperts(torch.nn.Module):
    """A stacked experts module of `num_experts` experts of a few weights each, whose forward does nothing: the
    hook around it is all that runs."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = torch.nn.Parameter(torch.zeros(num_experts, 4, 2))
        self.down_proj = torch.nn.Parameter(torch.zeros(num_experts, 2, 2))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        return hidden_states


class TinyBlock(torch.nn.Module):
    def __init__(self, num_experts: int, top_k: int):
        super().__init__()
        self.experts = TinyExperts(num_experts)
        self.gate = torch.nn.Linear(2, num_experts, bias=False)
        self.gate.top_k = top_k


class ExpertsOnly(torch.nn.Module):
    """`num_layers` MoE blocks and nothing else."""

    def __init__(self, num_layers: int, num_experts: int, top_k: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(TinyBlock(num_experts, top_k) for _ in range(num_layers))


@torch.no_grad()
def record_trace(
    model: torch.nn.Module, tokens: int = TRACE_TOKENS
) -> tuple[list[tuple[int, torch.Tensor]], int, int, int]:
    """The routing of the DeepSeek-V3-shaped model over a prompt of `tokens` random tokens, replayed as decode calls
    one token at a time (a random-weight model's own decode settles on a few experts; its tokens' routing over a
    varied prompt does not): [(layer, top_k_index [1, K])] token by token, then layers, experts, k. model: a
    DeepSeek-V3-shaped model."""
    prompt = torch.randint(0, VOCAB, (1, tokens), generator=torch.Generator().manual_seed(1))
    with RoutingRecorder(model) as trace:
        model(prompt)
    calls = [(layer, trace.index[layer][0][t : t + 1]) for t in range(tokens) for layer in range(len(trace.index))]
    return calls, len(trace.index), model.config.n_routed_experts, model.config.num_experts_per_tok


def replay_rows(sizes: int = len(LAYERS), spread: torch.nn.Module | None = None) -> list[dict]:
    """Per routing (default and spread) and pool size (the smallest, the largest and `sizes` in all): microseconds
    per replayed layer call (all of it, and the runtime's own share) and per miss, the hit rate, and the keys the
    eviction policy examined per eviction. spread: the spread DeepSeek-V3-shaped model, when it is built already."""
    model = scale_model("deepseek-v3")
    traces = {"default": record_trace(model)}
    if spread is None:  # the same model with its embeddings scaled: one 730M-parameter build, not two
        spread_routing(model)
        spread = model
    traces["spread"] = record_trace(spread)
    return [{"routing": routing, **r} for routing, trace in traces.items() for r in _replay(sizes, *trace)]


def _replay(sizes: int, trace: list[tuple[int, torch.Tensor]], trace_layers: int, experts: int, top_k: int
            ) -> list[dict]:  # fmt: skip
    hidden, weights = torch.zeros(1, 2), torch.full((1, top_k), 1.0 / top_k)
    out = []
    picks = sorted({round(i * (len(LAYERS) - 1) / max(sizes - 1, 1)) for i in range(sizes)})
    for layers in [LAYERS[i] for i in picks]:
        model = ExpertsOnly(layers, experts, top_k)
        steps = len(trace) // trace_layers  # decode steps in the trace: each replays over every layer
        calls = [
            (layer, trace[step * trace_layers + layer % trace_layers][1])
            for step in range(steps)
            for layer in range(layers)
        ]
        handle = patch(model, budget=BUDGET, device="cpu", miss_path="fetch", prefetch=None)
        try:
            mods = [b.experts for b in model.layers]
            warm, timed = calls[: WARM_STEPS * layers], calls[WARM_STEPS * layers :][:REPLAY_CALLS]
            for layer, idx in warm:  # the cache follows the trace
                mods[layer](hidden, idx, weights)
            handle.reset_stats()
            steps0 = handle.cache.slots.victim_steps
            t0 = time.perf_counter()
            for layer, idx in timed:
                mods[layer](hidden, idx, weights)
            took, n = time.perf_counter() - t0, len(timed)
            s = handle.stats()
            steps = handle.cache.slots.victim_steps - steps0
            out.append(
                {
                    "layers": layers,
                    "slots": s.slots,
                    "sets": len(handle.cache.slots.sets),
                    "calls": n,
                    "us_per_call": 1e6 * took / n,
                    "misses_per_call": s.misses / n,
                    "us_per_miss": 1e6 * took / s.misses if s.misses else 0.0,
                    "runtime_us_per_call": s.runtime_us_per_call,
                    "hit_rate": s.hit_rate,
                    "evictions": s.evictions,
                    "victim_steps_per_eviction": steps / s.evictions if s.evictions else 0.0,
                }
            )
        finally:
            handle.unpatch()
    return out
