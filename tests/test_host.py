"""Host compute and the per-miss cost model: lossless, the right choice per miss, robust under concurrency."""

import threading
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import offload_moe
from hooks import RoutingRecorder
from offload_moe.options import default_miss_path
from offload_moe.runtime.counters import Counters
from offload_moe.runtime.host import HostCompute
from offload_moe.runtime.miss_router import HostFit, MissPolicy, MissRouter
from tests.corpus import corpus_text
from tests.emulation import EmulatedHost, EmulatedLink, emulated
from tests.helpers import DEVICES, FAMILIES, generate, load_reference, logits, tiny_model

SLOW_LINK = EmulatedLink(gbps=0.02)  # a tiny model's expert: ~1 ms a copy, the host wins decode


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget", [0.25, 0.5])
@pytest.mark.parametrize("miss_path", ["host", "auto"])
def test_host_and_auto_are_lossless(family, budget, miss_path, device, patched):
    model = tiny_model(family).to(device)
    ids = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1)).to(device)
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids)
    link = SLOW_LINK if device == "cpu" else None  # on CUDA the real link, and auto decides from its measurements
    handle = patched(model, budget=budget, device=device, options=emulated(link), miss_path=miss_path)
    try:
        torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=1e-5)
        assert torch.equal(generate(model, ids), ref_tokens)
        stats = handle.stats()
        assert stats.miss_path == miss_path and stats.host_tokens >= stats.host_experts
        assert stats.host_experts > 0 or (miss_path == "auto" and device == "cuda")  # a real link may always win
        assert stats.resident_bytes <= stats.budget_bytes
        if miss_path == "host":
            assert stats.auto_copy == 0 and stats.copies < stats.misses  # only background copies
    finally:
        handle.unpatch()


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("miss_path", ["host", "auto"])
def test_reference_model_host_compute_is_lossless(reference_dir, impl, miss_path, patched):
    """eager: bit-identical when the host worker uses as many threads as the compute thread (BLAS rounds the same);
    batched_mm and grouped_mm: within float32 rounding, as grouped_mm is for fetch."""
    model, tokenizer = load_reference(reference_dir)
    model.set_experts_implementation(impl)
    ids = torch.tensor(tokenizer(corpus_text("val", max_bytes=4000))["input_ids"])
    prompt, batch = ids[:300][None], torch.stack([ids[300:340], ids[400:440]])
    ref_logits, ref_tokens = logits(model, prompt), generate(model, batch, 10)
    link = EmulatedLink(gbps=0.05)
    handle = patched(model, budget=0.25, device="cpu", options=emulated(link), miss_path=miss_path,
                               host_threads=torch.get_num_threads())  # fmt: skip
    try:
        got = logits(model, prompt)
        if impl == "eager":
            assert torch.equal(got, ref_logits)
        else:
            torch.testing.assert_close(got, ref_logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(generate(model, batch, 10), ref_tokens)
        assert handle.stats().host_experts > 0
    finally:
        handle.unpatch()


def test_host_compute_from_a_memory_mapped_per_expert_checkpoint(tmp_path):
    tiny_model("mixtral").save_pretrained(tmp_path)  # per-expert layout: gate and up are separate pieces
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    model, handle = offload_moe.load(tmp_path, budget=0.25, device="cpu", miss_path="host")
    torch.testing.assert_close(logits(model, ids), logits(ref, ids), rtol=0, atol=1e-5)
    assert handle.stats().host_experts > 0
    handle.unpatch()


class _Link:
    """A transfer engine as the cost model sees it: a fixed copy time and wait, to a GPU unless `device` says."""

    def __init__(self, copy_s, wait_s=0.0, device="cuda"):
        self.copy_s, self.wait_s, self.device = copy_s, wait_s, torch.device(device)

    def copy_seconds(self):
        return self.copy_s

    def demand_wait_seconds(self):
        return self.wait_s


def test_on_a_cpu_device_a_copied_expert_also_costs_the_cpu_its_kernel_pass():
    """Six one-token misses, 1 ms each on the host. Behind a GPU's link of 2 ms a copy, host and link share them
    (4 and 2); on a CPU device a copied expert is then computed on the host's own cores, so the same link copies
    none; a fast link to a CPU device whose passes cost 0.5 ms an expert copies them all."""
    fit, misses = HostFit(a=1e-3, b=0.0), {e: 1 for e in range(6)}
    gpu = MissRouter("auto", _Link(2e-3), host=None, fit=fit, counters=Counters(num_layers=1))
    copy, host = gpu.split(misses)
    assert (len(copy), len(host)) == (2, 4)
    cpu = MissRouter("auto", _Link(2e-3, device="cpu"), host=None, fit=fit, counters=Counters(num_layers=1))
    assert cpu.split(misses) == (set(), set(misses))  # no pass timed yet: a pass costs as much as a host job
    fast = MissRouter("auto", _Link(0.25e-3, device="cpu"), host=None, fit=fit, counters=Counters(num_layers=1))
    fast.observe_pass(experts=4, seconds=2e-3)  # 0.5 ms an expert
    assert fast.split(misses) == (set(misses), set())


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


def test_the_cost_model_follows_a_host_slowdown_that_starts_and_stops():
    """Decode misses of Mixtral-8x7B-like costs (copy 14 ms, host 5.75 ms for one token). The host slows down 4x for
    200 layer calls, then recovers. auto moves the misses to the link within a few host jobs of the slowdown, and
    back to the host within 4 exploration rounds (one miss in EXPLORE_EVERY calls goes to the host while none does)
    after it ends. Regret against an oracle that knows the host's speed: the extra seconds are the few jobs
    before each switch plus the exploration jobs, under 10% of the run here."""
    from offload_moe.runtime.miss_router import EXPLORE_EVERY

    fit = HostFit(a=5.4e-3, b=0.35e-3)
    router = MissRouter("auto", _Link(14e-3), host=None, fit=fit, counters=Counters(num_layers=1))
    slow = range(100, 300)
    spent = oracle = 0.0
    on_host = []
    for call in range(500):
        true_host = (5.4e-3 + 0.35e-3) * (4 if call in slow else 1)
        copy, host = router.split({3: 1})
        on_host.append(bool(host))
        spent += true_host if host else 14e-3
        oracle += min(true_host, 14e-3)
        if host:
            router.observe([1], true_host)
    assert all(on_host[:100])  # the fast host is used ...
    assert all(on_host[300 + 4 * EXPLORE_EVERY :])  # ... and found again within 4 exploration rounds of the end
    in_slow = on_host[110:300]
    assert sum(in_slow) <= len(in_slow) / EXPLORE_EVERY + 1  # during it: only the exploration jobs
    assert spent / oracle - 1 < 0.10


class _EveryOtherMissOnTheHost(MissPolicy):
    name = "every-other"

    def split(self, tokens, admit=lambda e: True):
        order = sorted(tokens)
        return set(order[1::2]), set(order[::2])


def test_a_custom_miss_policy_is_lossless_and_reported_by_its_own_name(patched):
    """A `MissPolicy` subclass is resolved once (`OffloadOptions.miss_setup`): it runs with the host's costs
    measured, both paths serve its misses exactly, and the stats name it (its `name`, else its class name)."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    ref = logits(model, ids)
    handle = patched(model, budget=0.25, device="cpu", miss_path=_EveryOtherMissOnTheHost)
    assert torch.equal(logits(model, ids), ref)
    s = handle.stats()
    assert s.miss_path == "every-other" and s.host_experts > 0 and s.copies > 0
    handle.unpatch()
    unnamed = type("SplitInHalves", (_EveryOtherMissOnTheHost,), {"name": ""})
    assert patched(model, budget=0.25, device="cpu", miss_path=unnamed).stats().miss_path == "SplitInHalves"


@pytest.mark.bench
def test_the_freetoken_split_gives_the_host_its_bandwidth_share_only_above_twice_the_link(patched):
    """The lab's FreeToken-style baseline plugs in as a miss policy class: decodes losslessly, and sends misses to
    the host only when the host's measured bandwidth is over twice the link's."""
    from lab.freetoken_split import FreeTokenSplit

    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    ref = logits(model, ids)
    fast_link, slow_host = EmulatedLink(gbps=50), EmulatedHost(gbps=0.001)  # both paced: a loaded CPU changes no
    handle = patched(  # decision (copies measure far faster than the host's jobs): nothing goes to the host
        model, budget=0.25, device="cpu", options=emulated(fast_link, slow_host), miss_path=FreeTokenSplit
    )
    assert torch.equal(logits(model, ids), ref)
    s = handle.stats()
    assert s.auto_copy > 0 and s.auto_host == 0
    handle.unpatch()
    slow_link = EmulatedLink(gbps=0.001)  # copies far slower: the host takes its share
    handle = patched(model, budget=0.25, device="cpu", options=emulated(slow_link), miss_path=FreeTokenSplit)
    assert torch.equal(logits(model, ids), ref)
    assert handle.stats().auto_host > 0


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
    host = EmulatedHost(gbps=0.05)
    handle = patched(
        model, budget=0.25, device="cpu", options=emulated(SLOW_LINK, host), miss_path="auto", prefetch="lookahead"
    )
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
    assert stats.host_experts > 0 and stats.copies > 0 and stats.prefetches > 0
    assert stats.host_experts <= stats.host_tokens <= 2 * stats.host_experts  # batch 2: one or two tokens per expert
    handle.unpatch()
    assert time.monotonic() - t0 < 300


def test_host_jobs_do_not_fire_forward_hooks(patched):
    """The host computes on a twin of the experts module: a RoutingRecorder sees only the router's choices."""
    model = tiny_model("mixtral")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    with RoutingRecorder(model) as ref_trace:
        generate(model, ids, 4)
    handle = patched(model, budget=0.25, device="cpu", miss_path="host")
    with RoutingRecorder(model) as trace:
        generate(model, ids, 4)
    assert handle.stats().host_experts > 0
    assert [len(calls) for calls in trace.index] == [len(calls) for calls in ref_trace.index]
    assert all(torch.equal(a, b) for x, y in zip(trace.index, ref_trace.index, strict=True)
               for a, b in zip(x, y, strict=True))  # fmt: skip
    handle.unpatch()


def test_bad_host_options(patched):
    model = tiny_model("mixtral")
    with pytest.raises(ValueError, match="host_threads must be >= 1"):
        patched(model, budget=0.5, device="cpu", host_threads=0)
    with pytest.raises(ValueError, match="gbps > 0 and gflops > 0"):
        EmulatedHost(gbps=0)
    with pytest.raises(ValueError, match="unknown miss_path 'cpu'"):
        patched(model, budget=0.5, device="cpu", miss_path="cpu")


@pytest.mark.parametrize(("precision", "bound"), [("int8", 0.02), ("int4", 0.2)])
def test_low_bit_host_experts_stay_near_the_model_at_decode(precision, bound, patched):
    """host_precision: decode steps (one token per expert) take the low-bit copies, within a measured bound of the
    unpatched logits and not equal to them."""
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache, ref = DynamicCache(), []
        for t in range(ids.shape[1]):
            ref.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    handle = patched(model, budget=0.25, device="cpu", miss_path="host", host_precision=precision)
    lowbit_tokens = handle.stats().host["lowbit_tokens"]
    assert lowbit_tokens >= 1
    with torch.no_grad():
        cache, got = DynamicCache(), []
        for t in range(ids.shape[1]):
            got.append(model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    err = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(got, ref, strict=True))
    assert 0 < err <= bound, err
    assert handle.stats().host_experts > 0


@pytest.mark.bench
def test_low_bit_host_experts_give_calls_longer_than_their_crossover_the_native_weights():
    """A call with more tokens per expert than the low-bit kernel measured faster at reads the native weights: its
    result equals the lossless host path's; at one token it does not."""
    from lab.host_bench import experts_of

    module, store = experts_of(256, 64, 4)
    exact = HostCompute(store, [module], store.names, 256, torch.device("cpu"), Counters(1))
    low = HostCompute(store, [module], store.names, 256, torch.device("cpu"), Counters(1), precision="int8")
    gen = torch.Generator().manual_seed(0)
    for n, same in ((1, False), (low.lowbit_tokens + 1, True)):
        x = torch.randn(n, 256, generator=gen)
        w, ids = torch.ones(n, 1), np.full((n, 1), 2, dtype=np.int64)
        got, want = (h.result(h.submit(0, [2], x, w, ids, False, torch.float32))[0] for h in (low, exact))
        assert torch.equal(got, want) == same
    exact.shutdown()
    low.shutdown()


def test_bad_host_precision(patched):
    with pytest.raises(ValueError, match="unknown host_precision 'fp8'"):
        patched(tiny_model("mixtral"), budget=0.5, device="cpu", miss_path="host", host_precision="fp8")


def test_default_miss_path_depends_on_the_device_only(patched):
    """ "auto" where the device is not the host (CUDA), "fetch" on a CPU device, emulated link or not."""
    model = tiny_model("mixtral")
    plain = patched(model, budget=0.5, device="cpu")
    assert plain.stats().miss_path == "fetch"
    plain.unpatch()
    paced = patched(model, budget=0.5, device="cpu", options=emulated(SLOW_LINK))
    assert paced.stats().miss_path == "fetch" and paced.stats().link["emulated"]
    paced.unpatch()
    assert default_miss_path("cuda") == "auto" and default_miss_path("cuda", "static-layers") == "host"


def test_auto_sends_to_the_host_a_copy_the_cache_should_not_admit_unless_the_host_is_much_slower():
    """The same costs: the third decode miss would take 17.25 ms on the host against 14 ms on the link, within
    ADMIT_SLACK, so when its copy would evict an expert needed more often it is computed on the host; a 64-token
    prefill (27.8 ms on the host) is copied whatever it evicts."""
    router = MissRouter("auto", _Link(14e-3), host=None, fit=HostFit(a=5.4e-3, b=0.35e-3), counters=Counters(1))
    assert router.split({1: 1, 2: 1, 3: 1}, admit=lambda e: False) == (set(), {1, 2, 3})
    assert router.split({1: 1, 2: 1, 3: 1}, admit=lambda e: True)[0] == {3}
    assert router.split({3: 64}, admit=lambda e: False) == ({3}, set())


@pytest.mark.parametrize(("precision", "bound"), [("int8", 0.015), ("int4", 0.15)])
@pytest.mark.parametrize("shape", [(24, 128), (128, 24), (40, 40), (48, 8)])
def test_low_bit_matrices_of_any_width_multiply_within_their_bound(precision, bound, shape):
    """torch's int8 kernel reads inputs in blocks of 16 and its int4 kernel packs rows in blocks of 16 (other widths
    crashed): the copies are padded with zeros, so any expert shape multiplies, within the format's error."""
    from offload_moe.runtime.host_kernel import LowBit

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen).to(torch.bfloat16)
    low = LowBit(w, precision)
    for n in (1, 5, 33):
        x = torch.randn(n, shape[1], generator=gen).to(torch.bfloat16)
        ref = x.float() @ w.float().T
        y = low.matmul(x)
        assert y.shape == ref.shape
        assert 0 < float((y.float() - ref).abs().max() / ref.abs().max()) <= bound
