import pytest

from offload_moe.budget import budget_bytes
from offload_moe.runtime.eviction import LFU, LRU, make_eviction


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


def test_lru_evicts_least_recent_allowed():
    lru = LRU()
    for k in "abcd":
        lru.touch(k)
    lru.touch("a")
    assert lru.victim("abcd") == "b"
    assert lru.victim("acd") == "c"
    lru.forget("c")
    assert lru.victim("acd") == "d"
    assert lru.victim("") is None


def test_lfu_evicts_least_frequent_then_oldest():
    lfu = LFU()
    for k in "aabbbcd":
        lfu.touch(k)
    assert lfu.victim("abcd") == "c"  # c and d used once; c is older
    lfu.touch("c")
    assert lfu.victim("abcd") == "d"


def test_unknown_eviction_policy():
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_eviction("fifo")
