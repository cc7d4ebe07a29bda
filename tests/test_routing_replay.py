"""`fit`'s hit rate: a routing trace replayed through the cache's own slot table counts what the runtime counts."""

import torch
from transformers import DynamicCache

from hooks import RoutingRecorder
from offload_moe.routing_replay import replay, warmup_tokens
from tests.helpers import tiny_model


def test_a_replayed_trace_hits_exactly_what_the_runtime_hits(patched):
    """Decoding token by token with miss_path="fetch", the runtime's hits and misses after the warm-up equal the
    replay's of the routing it saw (the warm start's experts have aged out of LRU by then)."""
    model = tiny_model("qwen3_moe")  # 8 experts, top-4
    tokens = 160
    ids = torch.randint(0, 128, (1, tokens), generator=torch.Generator().manual_seed(7))
    handle = patched(model, budget=0.5, device="cpu", miss_path="fetch")
    cache = DynamicCache()
    with RoutingRecorder(model) as trace, torch.no_grad():
        for t in range(tokens):
            if t == warmup_tokens(tokens):
                handle.reset_stats()
            model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
    routing = torch.stack([trace.layer_index(i) for i in range(len(trace.index))], dim=1)  # [T, L, K]
    s = handle.stats()
    got = replay(routing, s.slots, 8, 4, "lru")
    counted = tokens - warmup_tokens(tokens)
    assert s.misses > 0 and s.hits > 0
    replayed = (round(got.hits * counted), round(got.misses * counted), round(got.missing_calls * counted))
    assert replayed == (s.hits, s.misses, s.missing_calls)


def test_a_larger_budget_never_hits_less_and_everything_resident_hits_all():
    routing = torch.randint(0, 16, (200, 3, 2), generator=torch.Generator().manual_seed(1))
    rates = [replay(routing, slots, 16, 2, "lru").hit_rate for slots in (6, 12, 24, 48)]
    assert rates == sorted(rates) and rates[0] < 0.5 and rates[-1] == 1.0
