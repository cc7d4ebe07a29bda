"""Each private torch / transformers internal the project relies on, checked on the installed versions, and the
message a user gets when one is gone."""

import gc
import threading
import weakref

import pytest
import torch
from transformers import DynamicCache, GptOssConfig, GptOssForCausalLM
from transformers.generation.continuous_batching.scheduler import Scheduler

import offload_moe
from fairness.serving import compat as cb_compat
from fairness.serving.cb_scheduler import FairScheduler
from hooks import IncompatibleVersionError, find_moe_blocks
from offload_moe import compat
from tests.helpers import FAMILIES, tiny_model


def _experts():
    return tiny_model("mixtral").model.layers[0].mlp.experts


def test_parameter_swap_round_trips():
    experts = _experts()
    names = list(compat.parameters(experts))
    originals = {n: compat.parameters(experts)[n] for n in names}
    other = {n: torch.nn.Parameter(torch.zeros_like(p), requires_grad=False) for n, p in originals.items()}
    saved = compat.swap_parameters(experts, other)
    assert all(saved[n] is originals[n] for n in names)
    assert all(getattr(experts, n) is other[n] for n in names)
    compat.swap_parameters(experts, saved)
    assert all(getattr(experts, n) is originals[n] for n in names)


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_stock_kernels_skip_sentinel_ids_in_expert_parallel_mode(impl):
    """The pool's waves mark pairs outside a wave with id == num_experts: the kernels must skip them."""
    experts = _experts()
    experts.config._experts_implementation = impl
    x = torch.randn(5, experts.config.hidden_size)
    ids = torch.tensor([[0, 1], [2, 3], [1, 4], [5, 6], [7, 0]])
    w = torch.rand(5, 2)
    n = experts.num_experts
    sentinel = ids.clone()
    sentinel[:, 1] = n  # every second pair outside the "wave"
    was = compat.set_expert_parallel(experts, True)
    try:
        with torch.no_grad():
            masked = experts(x, sentinel, w.masked_fill(sentinel == n, 0))
    finally:
        compat.set_expert_parallel(experts, was)
    with torch.no_grad():
        first_only = experts(x, ids, w * torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(masked, first_only, rtol=1e-5, atol=1e-6)


def test_grouped_mm_casts_its_input_and_bins_one_slot_windows_over_the_ids_range():
    """What the passes rely on: grouped_mm takes hidden states wider than its weights and returns its weighted sums
    unrounded in that dtype; with a window of one slot it counts sentinel rows into expert 0's group (so a masked
    pass runs over at least `MASKED_WINDOW` slots, where they stay out)."""
    experts = _experts()
    experts.config._experts_implementation = "grouped_mm"
    assert compat.casts_input(experts)
    experts = experts.to(torch.bfloat16)
    x = torch.randn(3, experts.config.hidden_size).to(torch.bfloat16)
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 4]]), torch.rand(3, 2)
    with torch.no_grad():
        wide = experts(x.float(), ids, w)
        assert wide.dtype == torch.float32 and torch.equal(wide.to(torch.bfloat16), experts(x, ids, w))
    for window, counted in ((1, 2), (2, 1)):  # grouped_mm's histc over ids [0, sentinel]: expert 0's rows
        ids = torch.tensor([0.0, window])
        assert int(torch.histc(ids, bins=window, min=0, max=window - 1)[0]) == counted
    assert compat.MASKED_WINDOW == 2


@pytest.mark.parametrize("family", [*FAMILIES, "gpt_oss"])
def test_the_host_kernels_gate_is_the_modules_own_to_the_bit(family):
    """`gate_function` calls transformers' default gate's activation without a module call, and keeps a model's own
    gate (gpt-oss clamps) as it is: either way the module's `_apply_gate` bits."""
    if family == "gpt_oss":
        cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                           num_local_experts=4, num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8)  # fmt: skip
        experts = GptOssForCausalLM(cfg).model.layers[0].mlp.experts
    else:
        experts = next(b.experts for b in find_moe_blocks(tiny_model(family)))
    gate = compat.gate_function(experts)
    assert (gate == experts._apply_gate) == (family == "gpt_oss")  # a bound method compares by function and module
    gate_up = torch.randn(5, 48, generator=torch.Generator().manual_seed(0)) * 4
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):
            assert torch.equal(gate(gate_up.to(dtype)), experts._apply_gate(gate_up.to(dtype)))


def test_paged_cache_check_and_init_weights_exist():
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    model = tiny_model("mixtral")
    assert not compat.is_paged_cache(None) and not compat.is_paged_cache(DynamicCache())
    assert compat.is_paged_cache(PagedAttentionCache.__new__(PagedAttentionCache))
    compat.init_weights(model, model.model.rotary_emb)


def test_a_missing_internal_names_itself_and_the_tested_versions(monkeypatch):
    monkeypatch.delattr(Scheduler, "_process_candidates")
    with pytest.raises(IncompatibleVersionError, match=r"_process_candidates.*tested with transformers 5\.24"):
        cb_compat.process_candidates(object.__new__(FairScheduler), [], 1, 1, set())
    with pytest.raises(IncompatibleVersionError, match=r"PreTrainedModel._init_weights.*torch 2\.13"):
        compat.init_weights(torch.nn.Linear(1, 1), torch.nn.Linear(1, 1))


def test_served_scheduler_internals_exist():
    for name in ("_process_candidates", "_cleanup_waiting_queue"):
        assert callable(getattr(Scheduler, name, None)), name
    cb_compat.register_scheduler_class("compat-probe", Scheduler)
    assert cb_compat.is_registered("compat-probe")
    cb_compat.unregister_scheduler_class("compat-probe")
    assert not cb_compat.is_registered("compat-probe")


def test_a_patched_model_dropped_without_unpatch_is_freed_with_its_workers():
    model = tiny_model("mixtral")
    offload_moe.patch(model, budget=0.5, device="cpu", miss_path="host", prefetch=None)
    ref = weakref.ref(model)
    workers_before = threading.active_count()
    del model
    gc.collect()
    assert ref() is None
    assert threading.active_count() < workers_before  # the transfer and host workers stopped
