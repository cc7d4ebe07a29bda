"""Static placements (the baselines users run today), and lossless offloading with copies moved in chunks and
speculative copies preempted by demand ones."""

import pytest
import torch

import offload_moe
from offload_moe.runtime.speculation import Payoff
from tests.emulation import EmulatedLink, emulated
from tests.helpers import DEVICES, generate, logits, tiny_model

SLOW = EmulatedLink(gbps=0.005)  # a tiny expert (18 kB) takes ~3.7 ms: copies overlap compute


@pytest.mark.parametrize("device", DEVICES)
def test_lossless_with_chunked_and_preempted_copies(device, patched, monkeypatch):
    """Speculation forced on (its pay-off policy would stop lookahead on this slow link): many speculative copies,
    preempted by demand ones between 1 KB chunks, and the outputs still equal the unpatched model's."""
    monkeypatch.setattr(Payoff, "allows", lambda self: True)
    model = tiny_model("mixtral").to(device)
    ids = torch.randint(0, 128, (2, 24), device=device)
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids, 12)
    handle = patched(model, budget=0.25, device=device, options=emulated(SLOW), miss_path="fetch", prefetch="lookahead",
                     chunk_bytes=1024)  # fmt: skip
    torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(generate(model, ids, 12), ref_tokens)
    stats = handle.stats()
    assert stats.prefetches > 0 and stats.preemptions > 0  # speculative copies were set aside for demand ones
    assert stats.link_seconds >= stats.speculative_link_seconds > 0


def test_static_layers_keeps_whole_last_layers_and_computes_misses_on_the_host(patched):
    model = tiny_model("mixtral")  # 3 layers of 8 experts
    ids = torch.randint(0, 128, (1, 16))
    ref_logits, ref_tokens = logits(model, ids), generate(model, ids, 8)
    handle = patched(model, budget=1 / 3, device="cpu", placement="static-layers")
    resident = sorted(handle.cache.resident())
    assert resident == [(2, e) for e in range(8)]  # llama.cpp's --n-cpu-moe 2: the first two layers on the host
    torch.testing.assert_close(logits(model, ids), ref_logits, rtol=0, atol=1e-5)
    assert torch.equal(generate(model, ids, 8), ref_tokens)
    stats = handle.stats()
    assert stats.copies == 0 and stats.host_experts > 0
    assert stats.miss_path == "host" and stats.placement == "static-layers"
    assert sorted(handle.cache.resident()) == resident  # nothing ever moved


def test_static_frequency_keeps_the_calibrations_most_used_experts(tmp_path, patched):
    model = tiny_model("qwen3_moe")
    path = tmp_path / "calib.safetensors"
    text = "".join(chr(32 + i % 90) for i in range(600))

    def tokenizer(t):  # a character per token: enough to route real activations through the tiny model
        return {"input_ids": [ord(c) % 128 for c in t]}

    calib = offload_moe.calibrate(model, [text], tokenizer, seq_len=64, path=path)
    handle = patched(model, budget=0.25, device="cpu", placement="static-frequency", calibration=path)
    slots = handle.stats().slots
    top = calib.frequencies.flatten().argsort(descending=True)[:slots].tolist()
    assert sorted(handle.cache.resident()) == sorted((i // 8, i % 8) for i in top)
    ids = torch.randint(0, 128, (1, 12))
    handle.unpatch()
    ref = logits(model, ids)
    patched(model, budget=0.25, device="cpu", placement="static-frequency", calibration=path)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"placement": "pinned"}, "unknown placement 'pinned'"),
        ({"placement": "static-layers", "miss_path": "fetch"}, "miss_path must be 'host' or None"),
        ({"placement": "static-layers", "prefetch": "lookahead"}, "pass prefetch=None"),
        ({"placement": "static-frequency"}, "calibration saw used most"),
        ({"chunk_bytes": 0}, "chunk_bytes must be >= 1"),
    ],
)
def test_bad_placement_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        offload_moe.OffloadOptions(**options)
