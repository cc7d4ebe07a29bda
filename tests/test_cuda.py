"""CUDA checks (skipped without a GPU): pinned host copies, the copy stream and its events under slot reuse; and
`make gpu-check`, whose benchmark path also runs on CPU so that it is exercised everywhere."""

import warnings

import pytest
import torch
from transformers import DynamicCache

import offload_moe
from tests.helpers import requires_cuda, tiny_model


@requires_cuda
def test_host_copies_are_pinned_and_the_pool_is_on_the_gpu():
    model = tiny_model("mixtral").to("cuda")
    handle = offload_moe.patch(model, budget=0.25, device="cuda")
    try:
        assert all(p.src.is_pinned() for layer in handle.store.experts for e in layer for p in e)
        assert all(t.device.type == "cuda" for t in handle.cache.pool.values())
        assert all(p.device.type == "cuda" for p in model.parameters())  # the model holds the pool, not the experts
    finally:
        handle.unpatch()


@requires_cuda
@pytest.mark.parametrize("prefetch", [None, "lookahead"])
def test_copy_stream_and_events_under_slot_reuse(prefetch):
    """The smallest budget (one layer's top-k slots: every layer call overwrites slots the previous one read),
    random tokens, batch 4, 400 decode steps: every step equals the unpatched model on the same GPU."""
    model = tiny_model("mixtral", seed=7).to("cuda")
    steps = torch.randint(0, 128, (400, 4, 1), generator=torch.Generator().manual_seed(8)).to("cuda")
    with torch.no_grad():
        cache, ref = DynamicCache(), []
        for ids in steps:
            ref.append(model(input_ids=ids, cache=cache, use_cache=True).logits)
    handle = offload_moe.patch(model, budget=2 / 24, device="cuda", miss_path="fetch", prefetch=prefetch)
    try:
        with torch.no_grad():
            cache = DynamicCache()
            for ids, want in zip(steps, ref, strict=True):
                got = model(input_ids=ids, cache=cache, use_cache=True).logits
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        stats = handle.stats()
        assert stats.slots == 2 and stats.evictions > 1000 and stats.copies == stats.evictions
    finally:
        handle.unpatch()


@requires_cuda
@pytest.mark.parametrize("miss_path", ["fetch", "host", "auto"])
def test_a_decode_step_makes_no_synchronizing_call_beyond_the_routing(miss_path):
    """Under torch.cuda.set_sync_debug_mode("warn"), one decode step at a quarter of the experts: none of the
    synchronizing CUDA calls the mode reports comes from offload_moe's own code. The routing's one wait per layer call
    (an event on its pinned copies, `hook.routing_on_host`) is the allowed synchronisation; the host path's input and
    output cross without blocking; lookahead is off (it predicts from the routing too)."""
    model = tiny_model("mixtral").to("cuda")
    handle = offload_moe.patch(model, budget=0.25, device="cuda", miss_path=miss_path, prefetch=None)
    try:
        ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(3)).to("cuda")
        with torch.no_grad():
            cache = DynamicCache()
            nxt = model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            handle.reset_stats()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model(input_ids=nxt, cache=cache, use_cache=True)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        ours = [f"{w.filename}:{w.lineno}" for w in caught if "offload_moe" in w.filename]
        assert not ours, ours
        s = handle.stats()
        assert s.missing_calls > 0 and (s.host_experts > 0 if miss_path == "host" else True)
    finally:
        handle.unpatch()


@pytest.mark.bench
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_gpu_check_says_so_without_cuda(capsys, tmp_path):
    from lab.gpu_check import main

    main(["--out", str(tmp_path)])
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "gpu-check.json").exists()


@pytest.mark.bench
def test_gpu_check_benchmark_runs_its_configurations():
    """The benchmark's code path, on a tiny Mixtral geometry on this machine's device (on a CPU, its compiled rows
    eager only: compiling them is most of a minute here, and test_compile covers compile=True)."""
    from lab.gpu_check import COMPILED, CONFIGS, MODES, mixtral_geometry, run_benchmark

    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = MODES if device == "cuda" else {"eager": False}
    config = mixtral_geometry(layers=2, hidden=64, intermediate=96, vocab=256)
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    result = run_benchmark(config, device, torch.float32, decode_tokens=4, prompt_tokens=16, modes=modes)
    assert [(r["mode"], r["name"]) for r in result["compiled"]] == [(m, n) for m in modes for n, _, _ in COMPILED]
    runs = result["runs"]
    assert [r["name"] for r in runs] == [name for name, _, _ in CONFIGS]
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 for r in runs)
    lru = next(r for r in runs if r["name"] == "lru")
    assert lru["copies"] > 0 and lru["copy_gbps"] > 0 and lru["overlap"] <= 1
    assert next(r for r in runs if r["name"] == "host")["host_experts"] > 0
