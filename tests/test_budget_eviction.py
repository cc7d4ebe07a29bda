import pytest
import torch

from offload_moe import OffloadOptions
from offload_moe.budget import budget_bytes
from offload_moe.runtime.eviction import LFU, LRU, LayerAware
from offload_moe.runtime.slots import SlotTable, make_policy


@pytest.mark.parametrize(
    ("budget", "expected"),
    [(0.25, 250), (1.0, 1000), (1, 1000), ("6GiB", 6 * 2**30), ("512MB", 512 * 10**6), ("1e3", 1000), ("2 kib", 2048)],
)
def test_budget_forms(budget, expected):
    assert budget_bytes(budget, 1000) == expected


@pytest.mark.parametrize("budget", [0, 0.0, -0.5, 1.5, 2])
def test_budget_fraction_out_of_range(budget):
    with pytest.raises(ValueError, match=r"not a fraction in \(0, 1\]"):
        budget_bytes(budget, 1000)


@pytest.mark.parametrize("budget", ["lots", "6 parsecs", "", "-1GiB"])
def test_budget_bad_size(budget):
    with pytest.raises(ValueError, match="is not a size"):
        budget_bytes(budget, 1000)


@pytest.mark.parametrize("budget", [True, None, [0.5]])
def test_budget_bad_type(budget):
    with pytest.raises(TypeError):
        budget_bytes(budget, 1000)


def test_lru_yields_least_recent_first():
    lru = LRU()
    for e in range(4):
        lru.touch((0, e))
    lru.touch((0, 0))
    assert list(lru.victims()) == [(0, 1), (0, 2), (0, 3), (0, 0)]
    lru.forget((0, 2))
    assert list(lru.victims()) == [(0, 1), (0, 3), (0, 0)]


def test_lfu_yields_least_frequent_then_oldest_and_counts_survive_eviction():
    lfu = LFU()
    for e in [0, 0, 1, 1, 1, 2, 3]:
        lfu.touch((0, e))
    assert list(lfu.victims()) == [(0, 2), (0, 3), (0, 0), (0, 1)]  # 2 and 3 used once; 2 is older
    lfu.touch((0, 2))
    assert next(lfu.victims()) == (0, 3)
    lfu.forget((0, 1))  # evicted after 3 uses ...
    lfu.touch((0, 1))  # ... and back: its 4th use
    assert list(lfu.victims()) == [(0, 3), (0, 0), (0, 2), (0, 1)]  # 0 and 2 used twice; 0 less recently


def test_layer_aware_yields_the_layer_that_runs_furthest_ahead_first():
    policy = LayerAware()
    for layer in range(4):
        policy.touch((layer, 0))
    policy.touch((1, 1))
    policy.at_layer(1, 4)  # layer 1 runs: layer 2 is next, layer 1 itself furthest
    assert list(policy.victims()) == [(1, 0), (1, 1), (0, 0), (3, 0), (2, 0)]


@pytest.mark.parametrize("policy", [LRU, LFU, LayerAware])
def test_a_policy_costs_a_bounded_number_of_steps_whatever_the_pool(policy):
    """O(1): at 1,000 and at 15,000 keys, a use, an eviction and the first victim take the same number of Python
    steps (counted by the slot table's victim walk, not timed)."""
    steps = []
    for n_layers in (4, 60):  # x 256 experts at a quarter: 256 and 3,840 slots... and 15,360 keys tracked
        table = SlotTable(n_layers, 256, n_layers * 64, top_k=8, eviction=policy, device=torch.device("cpu"))
        for layer in range(n_layers):
            for e in range(64):
                table.put((layer, e), table.take_free(layer)[0])
        before = table.victim_steps
        for layer in range(n_layers):  # each layer evicts 32 experts for new ones
            table.at_layer(layer)
            for e in range(64, 96):
                victim = table.victim(layer, lambda k: False)
                slot = table.remove(victim)
                table.put((layer, e), slot)
        steps.append((table.victim_steps - before) / (n_layers * 32))
    assert steps[0] == steps[1] <= 2.0


def test_unknown_eviction_policy():
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        OffloadOptions(eviction="fifo")
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo")


def test_an_eviction_policy_instance_is_copied_per_slot_set():
    proto = LRU()
    make = make_policy(proto)
    a, b = make(), make()
    a.touch((0, 0))
    assert list(b.victims()) == [] and list(proto.victims()) == [] and list(a.victims()) == [(0, 0)]
