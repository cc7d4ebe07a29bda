"""Host compute and the per-miss cost model: lossless, the right choice per miss, robust under concurrency."""

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import offload_moe
from hooks import RoutingRecorder
from lab.reference import corpus_text
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.miss_router import HostFit, MissRouter
from tests.helpers import DEVICES, FAMILIES, generate, load_reference, logits, tiny_model

SLOW_LINK = offload_moe.EmulatedLink(gbps=0.02)  # a tiny model's expert: ~1 ms a copy, the host wins decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.25, 0.5])
@pytest.mark.parametrize("fallback", ["host", "auto"])
def test_host_and_auto_are_lossless(family, budget, fallback, device, patched):
    model = tiny_model(family).to(device)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1)).to(device)
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    link = SLOW_LINK if device == "cpu" else None  # on CUDA the real link, and auto decides from its measurements
    handle = patched(model, budget=budget, device=device, fallback=fallback, link=link)
    try:
        torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=1e-5)
        assert torch.equal(generate(model, ids), ref_tokens)
        stats = handle.stats()
        assert stats.fallback == fallback and stats.host_tokens >= stats.host_jobs
        assert stats.host_jobs > 0 or (fallback == "auto" and device == "cuda")  # a real link may always win
        assert stats.resident_bytes <= stats.budget_bytes
        if fallback == "host":
            assert stats.auto_copy == 0 and stats.copies < stats.misses  # only background copies
    finally:
        handle.unpatch()


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("fallback", ["host", "auto"])
def test_reference_model_host_compute_is_lossless(reference_dir, impl, fallback, patched):
    """eager: bit-identical when the host worker uses as many threads as the compute thread (BLAS rounds the same);
    batched_mm and grouped_mm: within float32 rounding, as grouped_mm is for fetch."""
    model, tokenizer = load_reference(reference_dir)
    model.set_experts_implementation(impl)
    ids = torch.tensor(tokenizer(corpus_text("val", max_bytes=4000))["input_ids"])
    prompt, batch = ids[:300][None], torch.stack([ids[300:340], ids[400:440]])
    ref_logits, ref_tokens = logits(model, prompt), generate(model, batch, 10)
    link = offload_moe.EmulatedLink(gbps=0.05)
    handle = patched(model, budget=0.25, device="cpu", fallback=fallback, link=link,
                               host_threads=torch.get_num_threads())  # fmt: skip
    try:
        got = logits(model, prompt)
        if impl == "eager":
            assert torch.equal(got, ref_logits)
        else:
            torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(generate(model, batch, 10), ref_tokens)
        assert handle.stats().host_jobs > 0
    finally:
        handle.unpatch()


def test_host_compute_from_a_memory_mapped_per_expert_checkpoint(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)  # per-expert layout: gate and up are separate pieces
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    model, handle = offload_moe.load(tmp_path, budget=0.25, device="cpu", fallback="host")
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=1e-5)
    assert handle.stats().host_jobs > 0
    handle.unpatch()


class _Link:
    """A transfer engine as the cost model sees it: a fixed copy time and wait."""

    def __init__(self, copy_s, wait_s=0.0):
        self.copy_s, self.wait_s = copy_s, wait_s

    def copy_seconds(self):
        return self.copy_s

    def demand_wait_seconds(self):
        return self.wait_s


def test_cost_model_computes_decode_on_the_host_and_copies_long_prefills():
    """Mixtral-8x7B-like costs: a 352 MB copy takes 14 ms; the host reads the expert in 5.4 ms and needs 0.35 ms
    more per token, so the two cost the same at about 40 tokens."""
    fit = HostFit(a=5.4e-3, b=0.35e-3)
    counters = Counters(num_layers=1)
    router = MissRouter("auto", _Link(14e-3), host=None, fit=fit, counters=counters)
    assert router.split({3: 1}) == (set(), {3})  # one decode token: the host
    assert router.split({3: 64}) == ({3}, set())  # a long prefill: copy
    copy, host = router.split({1: 1, 2: 1, 3: 1})  # three decode misses: the host takes two, the link one
    assert len(host) == 2 and len(copy) == 1
    copy, host = router.split({e: 50 for e in range(6)})  # six prefill misses: both resources work at once
    assert copy and host
    busy = MissRouter("auto", _Link(14e-3, wait_s=0.2), host=None, fit=fit, counters=counters)
    assert busy.split({3: 64}) == (set(), {3})  # the link is busy for 200 ms: the host is faster after all
    assert counters.auto_host == 1 + 2 + len(host) + 1 and counters.auto_copy == 1 + 1 + len(copy)  # both routers
    fit.observe([1], 2 * fit.seconds(1))  # the host turned out slower: the estimate follows
    assert fit.scale > 1


@pytest.mark.slow
def test_stress_host_pool_copy_worker_and_compute_together(patched):
    """Random tokens, batch 2, 700 decode steps (2,100 layer calls) under auto with lookahead on an emulated link
    and host: every step equals the unpatched model, nothing deadlocks, both paths are used."""
    model = tiny_model("mixtral", seed=3)
    gen = torch.Generator().manual_seed(5)
    steps = torch.randint(0, 128, (700, 2, 1), generator=gen)
    with torch.no_grad():
        cache, ref = DynamicCache(), []
        for ids in steps:
            ref.append(model(input_ids=ids, cache=cache, use_cache=True).logits)
    host = offload_moe.EmulatedHost(gbps=0.05)
    handle = patched(model, budget=0.25, device="cpu", fallback="auto", link=SLOW_LINK, host=host, prefetch="lookahead")
    errors, worst = [], [0.0]

    def drive():
        try:
            with torch.no_grad():
                cache = DynamicCache()
                for ids, want in zip(steps, ref, strict=True):
                    got = model(input_ids=ids, cache=cache, use_cache=True).logits
                    worst[0] = max(worst[0], float((got - want).abs().max()))
        except BaseException as e:  # reported below
            errors.append(e)

    worker = threading.Thread(target=drive)
    t0 = time.monotonic()
    worker.start()
    worker.join(timeout=300)
    assert not worker.is_alive(), "deadlock: 700 decode steps did not finish in 300 s"
    assert not errors, errors
    assert worst[0] <= 1e-5, worst[0]
    stats = handle.stats()
    assert stats.host_jobs > 0 and stats.copies > 0 and stats.prefetches > 0
    assert stats.host_jobs <= stats.host_tokens <= 2 * stats.host_jobs  # batch 2: one or two tokens per job
    handle.unpatch()
    assert time.monotonic() - t0 < 300


def test_host_jobs_do_not_fire_forward_hooks(patched):
    """The host computes on a twin of the experts module: a RoutingRecorder sees only the router's choices."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with RoutingRecorder(model) as ref_trace:
        generate(model, ids, 4)
    handle = patched(model, budget=0.25, device="cpu", fallback="host")
    with RoutingRecorder(model) as trace:
        generate(model, ids, 4)
    assert handle.stats().host_jobs > 0
    assert [len(calls) for calls in trace.index] == [len(calls) for calls in ref_trace.index]
    assert all(torch.equal(a, b) for x, y in zip(trace.index, ref_trace.index, strict=True)
               for a, b in zip(x, y, strict=True))  # fmt: skip
    handle.unpatch()


def test_bad_host_options(patched):
    model = tiny_model("mixtral")
    with pytest.raises(TypeError, match="EmulatedHost"):
        patched(model, budget=0.5, device="cpu", host=3.0)
    with pytest.raises(ValueError, match="host_threads must be >= 1"):
        patched(model, budget=0.5, device="cpu", host_threads=0)
    with pytest.raises(ValueError, match="gbps > 0 and gflops > 0"):
        offload_moe.EmulatedHost(gbps=0)
    with pytest.raises(ValueError, match="unknown fallback 'cpu'"):
        patched(model, budget=0.5, device="cpu", fallback="cpu")


def test_default_miss_path_is_auto_only_when_the_device_is_not_the_host(patched):
    model = tiny_model("mixtral")
    plain = patched(model, budget=0.5, device="cpu")
    assert plain.stats().fallback == "fetch"
    plain.unpatch()
    emulated = patched(model, budget=0.5, device="cpu", link=SLOW_LINK)
    assert emulated.stats().fallback == "auto"
    emulated.unpatch()


def test_auto_sends_to_the_host_a_copy_the_cache_should_not_admit_unless_the_host_is_much_slower():
    """The same costs: the third decode miss would take 17.25 ms on the host against 14 ms on the link, within
    ADMIT_SLACK, so when its copy would evict an expert needed more often it is computed on the host; a 64-token
    prefill (27.8 ms on the host) is copied whatever it evicts."""
    router = MissRouter("auto", _Link(14e-3), host=None, fit=HostFit(a=5.4e-3, b=0.35e-3), counters=Counters(1))
    assert router.split({1: 1, 2: 1, 3: 1}, admit=lambda e: False) == (set(), {1, 2, 3})
    assert router.split({1: 1, 2: 1, 3: 1}, admit=lambda e: True)[0] == {3}
    assert router.split({3: 64}, admit=lambda e: False) == ({3}, set())
