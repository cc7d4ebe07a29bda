"""patch() is lossless with miss_path="fetch", accounts honestly, and unpatch() restores the model exactly."""

import pytest
import torch

import offload_moe
import offload_moe.sizing as sizing
from hooks import RoutingRecorder, find_moe_blocks, is_attached
from offload_moe import BudgetError, UnsupportedModelError
from offload_moe.runtime.cache import ExpertCache
from tests.emulation import EmulatedLink, emulated
from tests.helpers import DEVICES, FAMILIES, generate, logits, tiny_dense_model, tiny_model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.25, 0.5, 1.0])
def test_lossless_logits_and_greedy_tokens(family, budget, device, patched):
    model = tiny_model(family).to(device)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1)).to(device)  # batch > 1
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    handle = patched(model, budget=budget, device=device)
    try:
        torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=1e-5)
        assert torch.equal(generate(model, ids), ref_tokens)
        stats = handle.stats()
        assert stats.resident_bytes <= stats.budget_bytes
        if budget < 1.0:
            assert stats.misses > 0
        else:
            assert stats.misses == 0 and stats.hit_rate == 1.0
    finally:
        handle.unpatch()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_long_prompt_streams_experts_in_waves(family, device, patched):
    model = tiny_model(family).to(device)
    ids = torch.randint(0, 128, (2, 200), generator=torch.Generator().manual_seed(2)).to(device)
    ref = logits(model, ids)
    top_k = model.config.num_experts_per_tok
    smallest = top_k / 24  # exactly one layer's top-k: every prefill layer needs more experts than there are slots
    handle = patched(model, budget=smallest, device=device)
    try:
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5)
        stats = handle.stats()
        assert stats.slots == top_k and stats.waves == 3  # one per layer
    finally:
        handle.unpatch()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_kernel_runs_on_the_pool(impl, device, patched):
    model = tiny_model("mixtral").to(device)
    model.set_experts_implementation(impl)
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(3)).to(device)
    ref = logits(model, ids)
    handle = patched(model, budget=0.1, device=device)  # 2 slots: waves on every layer
    try:
        torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5)
        assert handle.stats().waves > 0
    finally:
        handle.unpatch()


def test_counts_add_up_against_an_independent_recount(patched):
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(4))
    handle = patched(model, budget=0.25, device="cpu", prefetch=None)
    handle.reset_stats()
    with RoutingRecorder(model) as trace:
        generate(model, ids, n=6)
    stats = handle.stats()
    # Each layer call needs its distinct routed experts once: hits + misses must equal that count exactly.
    needed = [sum(len(call.unique()) for call in trace.index[layer]) for layer in range(3)]
    per_layer = stats.per_layer
    assert [p.hits + p.misses for p in per_layer] == needed
    assert sum(p.misses for p in per_layer) == stats.misses == stats.copies  # no prefetch: copy = miss
    assert stats.bytes_copied == stats.copies * stats.expert_bytes
    assert stats.resident_bytes == stats.slots * stats.expert_bytes <= stats.budget_bytes
    assert stats.evictions == stats.copies  # the pool was full from the warm start
    handle.unpatch()


@pytest.mark.parametrize("device", DEVICES)
def test_unpatch_restores_parameters_bit_for_bit(device, patched):
    model = tiny_model("qwen2_moe").to(device)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = dict(model.named_parameters())
    ids = torch.randint(0, 128, (1, 12)).to(device)
    ref = logits(model, ids)
    handle = patched(model, budget=0.25, device=device)
    generate(model, ids)
    handle.unpatch()
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert dict(model.named_parameters()).keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())  # the same Parameter objects
    assert all(p.device.type == device for p in model.parameters())  # experts back where they were
    assert not any(is_attached(b.experts) for b in find_moe_blocks(model))
    assert torch.equal(logits(model, ids), ref)
    with pytest.raises(RuntimeError, match="already unpatched"):
        handle.unpatch()
    patched(model, budget=0.5, device=device).unpatch()  # patchable again


def test_lfu_eviction_is_lossless_too(patched):
    model = tiny_model("olmoe")
    ids = torch.randint(0, 128, (2, 20))
    ref = generate(model, ids)
    handle = patched(model, budget=0.25, device="cpu", eviction="lfu")
    assert torch.equal(generate(model, ids), ref)
    handle.unpatch()


def test_emulated_link_is_reported(patched):
    model = tiny_model("mixtral")
    handle = patched(model, budget=0.5, device="cpu", options=emulated(EmulatedLink(gbps=1.0)))
    logits(model, torch.randint(0, 128, (1, 8)))
    assert handle.stats().link == {"emulated": True, "gbps": 1.0, "latency_us": 0.0}
    handle.unpatch()


# --- bad input: a clear error, and nothing left half-patched -------------------------------------------------


def _assert_untouched(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(is_attached(b.experts) for b in find_moe_blocks(model))
    assert all(b.experts.num_experts == 8 for b in find_moe_blocks(model))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"budget": 0}, ValueError, "not a fraction"),
        ({"budget": -0.5}, ValueError, "not a fraction"),
        ({"budget": 1.5}, ValueError, "not a fraction"),
        ({"budget": "many"}, ValueError, "is not a size"),
        ({"budget": 0.05}, ValueError, "raise the budget to at least"),
        ({"budget": "1KiB"}, ValueError, "raise the budget to at least"),
        ({"device": "tpu"}, ValueError, "device='tpu'"),
        ({"device": "mps"}, ValueError, "not supported"),
        ({"miss_path": "pray"}, ValueError, "unknown miss_path 'pray'"),
        ({"eviction": "fifo"}, ValueError, "unknown eviction policy 'fifo'"),
        ({"link": 12.0}, TypeError, r"unknown option\(s\) \['link'\]"),
    ],
)
def test_bad_arguments_are_clear_and_leave_the_model_untouched(kwargs, error, match, patched):
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        patched(model, **{"device": "cpu", **kwargs})
    _assert_untouched(model, before)
    patched(model, budget=0.5, device="cpu").unpatch()


def test_a_budget_larger_than_the_devices_free_memory_is_refused_before_any_work(patched, monkeypatch):
    """A device with less free memory than the plan's slots (this machine's RAM stands in for a small device):
    refused with both sizes and a budget that fits, the model untouched; with room, the same budget patches."""
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: 4096)
    with pytest.raises(BudgetError, match=r"is free there; lower the budget \(a size such as budget='0.0GiB'") as e:
        patched(model, budget=0.5, device="cpu")
    assert "4.0 KiB is free" in str(e.value) and "for its expert slots" in str(e.value)
    _assert_untouched(model, before)
    monkeypatch.setattr(sizing, "free_device_bytes", lambda device: 1 << 40)
    patched(model, budget=0.5, device="cpu").unpatch()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda(patched):
    with pytest.raises(ValueError, match="torch sees no CUDA device"):
        patched(tiny_model("mixtral"), device="cuda")


def test_patching_twice_is_refused(patched):
    model = tiny_model("mixtral")
    handle = patched(model, budget=0.5, device="cpu")
    with pytest.raises(RuntimeError, match="already patched"):
        patched(model, budget=0.5, device="cpu")
    handle.unpatch()


def test_dense_model_is_refused_by_name(patched):
    dense = tiny_dense_model()
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM"):
        patched(dense, device="cpu")


def test_failure_midway_rolls_back(monkeypatch, patched):
    model = tiny_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken_warm(self, keys):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ExpertCache, "warm", broken_warm)
    with pytest.raises(RuntimeError, match="disk on fire"):
        patched(model, budget=0.5, device="cpu")
    _assert_untouched(model, before)
    assert offload_moe.handle_of(model) is None
