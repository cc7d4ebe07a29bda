"""The runtime at the routing scale of real models (issue 31): lossless through every exact miss path, passes that
compute as copies land, a copy that fails, and pools smaller than one token's working set."""

import numpy as np
import pytest
import torch

from offload_moe.runtime.store import HostStore
from tests.emulation import EmulatedLink, emulated
from tests.helpers import REFERENCE_MODEL_DIR, generate, load_reference, logits, tiny_model
from tests.scale_models import SHAPES, VOCAB, scale_model

SLOW_LINK = EmulatedLink(gbps=0.002)  # a tiny expert (12 kB) takes ~6 ms: copies land during compute


@pytest.fixture(scope="module")
def shapes():
    """Each routing-scale model (bf16, random weights), its prompt, and the unpatched logits and greedy tokens."""
    out = {}
    for name in SHAPES:
        model = scale_model(name)
        ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(2))
        out[name] = (model, ids, logits(model, ids), generate(model, ids, 3))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    ("budget", "miss_path"),
    [(1.0, "fetch"), (0.5, "fetch"), (0.5, "host"), (0.5, "auto"), (0.25, "fetch"), (0.25, "host"), (0.25, "auto")],
)
def test_routing_scale_shapes_are_bit_identical_through_every_exact_miss_path(shapes, shape, budget, miss_path,
                                                                                patched):  # fmt: skip
    """bf16, top-2 to top-8 routing, shared experts, grouped routing: with the default kernel a call's passes are
    summed per (token, expert) pair and rounded once, so logits equal the unpatched model's bit for bit."""
    model, ids, ref_logits, ref_tokens = shapes[shape]
    handle = patched(model, budget=budget, device="cpu", miss_path=miss_path)
    assert torch.equal(logits(model, ids), ref_logits)
    assert torch.equal(generate(model, ids, 3), ref_tokens)
    s = handle.stats()
    assert (s.misses > 0) == (budget < 1.0)
    if miss_path == "host" and budget < 1.0:
        assert s.host_experts > 0


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
def test_other_kernels_sum_their_passes_within_float32_rounding(impl, patched):
    """Kernels that take the hidden states only in the weights' dtype: passes are added as they come back, exact
    with top-2, within float32 rounding with top-4, greedy tokens identical."""
    for family in ("mixtral", "qwen3_moe"):  # top-2, top-4
        model = tiny_model(family)
        model.set_experts_implementation(impl)
        ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
        ref_logits, ref_tokens = logits(model, ids), generate(model, ids, 8)
        handle = patched(model, budget=0.25, device="cpu", options=emulated(SLOW_LINK), miss_path="fetch")
        torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=0 if family == "mixtral" else 1e-5)
        assert torch.equal(generate(model, ids, 8), ref_tokens)
        assert handle.stats().kernel_passes > handle.stats().layer_calls  # copies landed while experts computed
        handle.unpatch()


def test_resident_experts_compute_before_a_slow_copy_lands(patched):
    """On a link where a copy takes longer than a kernel pass, a call with misses computes its ready experts first
    and each missing one as it lands: more passes than calls, the same output."""
    model = tiny_model("qwen3_moe")  # top-4, grouped_mm
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(5))
    ref = logits(model, ids)
    handle = patched(model, budget=0.5, device="cpu", options=emulated(SLOW_LINK), miss_path="fetch")
    assert torch.equal(logits(model, ids), ref)
    s = handle.stats()
    assert s.missing_calls > 0 and s.kernel_passes > s.layer_calls


def test_a_copy_that_fails_frees_its_slot_and_the_call_says_which_expert(patched, monkeypatch):
    """A copy that fails mid-call (here: a source of the wrong size) raises an error naming the expert and layer;
    its slot is free again, nothing was computed from it, and the next call copies the expert properly."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    ref = logits(model, ids)
    handle = patched(model, budget=0.25, device="cpu", miss_path="fetch")
    good = HostStore.copy_sources
    broken: set = set()

    def sources(store, layer, expert):
        if not broken:
            broken.add((layer, expert))  # the first copy of the call breaks
        if (layer, expert) in broken:
            return [torch.zeros(3) for _ in good(store, layer, expert)]
        return good(store, layer, expert)

    monkeypatch.setattr(HostStore, "copy_sources", sources)
    with pytest.raises(RuntimeError, match=r"copying expert \d+ of MoE layer \d+ to cpu failed .*nothing was computed"):
        logits(model, ids)
    (key,) = broken
    assert key not in handle.cache.resident()
    monkeypatch.setattr(HostStore, "copy_sources", good)
    assert torch.equal(logits(model, ids), ref)


def test_a_pool_smaller_than_one_token_still_hits(patched):
    """Budget 1/8 of the Mixtral-shaped reference model: 8 slots for 8 layers of top-2 routing. Plain LRU evicts
    every layer's experts before the layer runs again (no hit at all); each layer keeping one expert hits."""
    model, tokenizer = load_reference(REFERENCE_MODEL_DIR)
    ids = torch.tensor([tokenizer("def main():\n    return os.path.join(root, name)\n")["input_ids"]])
    ref = generate(model, ids, 16)
    handle = patched(model, budget=1 / 8, device="cpu", miss_path="fetch")
    handle.reset_stats()
    assert torch.equal(generate(model, ids, 16), ref)
    s = handle.stats()
    assert s.slots == 8 and s.hits > 0.1 * (s.hits + s.misses)


def test_routing_takes_one_host_round_trip_per_call_that_may_miss(patched, monkeypatch):
    """The routing of a layer that may miss crosses to the host once per call (`routing_on_host`, ids and weights
    together), and nothing else does (no `Tensor.cpu`); a layer whose experts are all resident never crosses."""
    from offload_moe.runtime import hook

    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(7))
    routings, moves = [], []
    real_routing, real_cpu = hook.routing_on_host, torch.Tensor.cpu

    def routing(index, weights):
        routings.append(index.shape)
        return real_routing(index, weights)

    def cpu(t, *args, **kwargs):
        moves.append(t.shape)
        return real_cpu(t, *args, **kwargs)

    for budget in (1.0, 0.5):
        handle = patched(model, budget=budget, device="cpu", miss_path="fetch")
        routings.clear()
        monkeypatch.setattr(hook, "routing_on_host", routing)
        monkeypatch.setattr(torch.Tensor, "cpu", cpu)
        logits(model, ids)
        monkeypatch.setattr(torch.Tensor, "cpu", real_cpu)
        monkeypatch.setattr(hook, "routing_on_host", real_routing)
        s = handle.stats()
        assert len(routings) == s.layer_calls == (0 if budget == 1.0 else 3) and not moves
        handle.unpatch()


def test_the_slot_sets_keep_a_layer_call_s_window_within_its_set():
    """At DeepSeek-V3's geometry a quarter of the experts make 3,712 slots in sets of 256: each layer's experts stay
    inside its own set, so the kernel's window never spans more than one set."""
    from offload_moe.runtime.slots import SlotTable

    table = SlotTable(58, 256, 3712, top_k=8, eviction="lru", device=torch.device("cpu"))
    assert len(table.sets) == 14 and all(s.hi - s.lo >= 256 for s in table.sets)
    rng = np.random.default_rng(0)
    for _ in range(5000):
        layer, e = int(rng.integers(58)), int(rng.integers(256))
        if table.slot((layer, e)) >= 0:
            continue
        free = table.take_free(layer)
        slot = free[0] if free else table.remove(table.victim(layer, lambda k: False))
        table.put((layer, e), slot)
    for layer in range(58):
        lo, hi = table.set_range(layer)
        row = table.row(layer)
        assert ((row == -1) | ((row >= lo) & (row < hi))).all()
