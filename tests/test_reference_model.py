"""The shipped reference model: loads offline, is a genuinely good model, and offloading it is lossless."""

import pytest
import torch
from transformers import AutoModelForCausalLM, MixtralForCausalLM

from tests.corpus import corpus_text
from tests.helpers import DEVICES, load_reference
from tests.measure import bits_per_byte


@pytest.fixture(scope="module")
def reference(reference_dir):
    model, tokenizer = load_reference(reference_dir)
    return model, tokenizer


@pytest.fixture(scope="module")
def held_out_ids(reference):
    _, tokenizer = reference
    return torch.tensor(tokenizer(corpus_text("val", max_bytes=8000))["input_ids"])


def test_loads_offline_like_a_hub_checkpoint(reference, reference_dir):
    model, tokenizer = reference
    assert isinstance(model, MixtralForCausalLM)
    cfg = model.config
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2 and cfg.num_hidden_layers >= 6
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    size = sum(p.stat().st_size for p in reference_dir.iterdir() if p.is_file())
    assert size <= 12 * 2**20, f"{size / 2**20:.1f} MiB"


def test_held_out_bits_per_byte(reference):
    model, tokenizer = reference
    bpb = bits_per_byte(model, tokenizer, corpus_text("val", max_bytes=32_000))
    assert bpb < 1.6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("budget", [0.0625, 0.25, 0.5, 1.0])
def test_offloading_the_reference_model_is_lossless(reference, held_out_ids, budget, impl, device, patched):
    """On CPU, eager and batched_mm give bit-identical logits (top-2 sums are order-free); grouped_mm's CPU kernel
    blocks rows by group offsets, which change when experts sit in other slots: float32 rounding only. On CUDA the
    library may pick other GEMM kernels for slot views than for the original tensors: float32 rounding only."""
    model, _ = reference
    model.to(device).set_experts_implementation(impl)
    long_prompt = held_out_ids[:600][None].to(device)  # prefill routes to every expert of every layer
    batch = torch.stack([held_out_ids[600:640], held_out_ids[700:740]]).to(device)  # batch of 2
    with torch.no_grad():
        ref_logits = model(long_prompt).logits
        ref_tokens = model.generate(batch, max_new_tokens=12, do_sample=False)
    handle = patched(model, budget=budget, device=device)
    try:
        with torch.no_grad():
            logits = model(long_prompt).logits
            if impl == "grouped_mm" or device == "cuda":
                torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(logits, ref_logits)
            assert torch.equal(model.generate(batch, max_new_tokens=12, do_sample=False), ref_tokens)
        stats = handle.stats()
        assert stats.resident_bytes <= stats.budget_bytes
        assert (stats.waves > 0) == (stats.slots < 8)  # fewer slots than one layer's experts: waves
    finally:
        handle.unpatch()
        model.to("cpu")


def test_load_matches_from_pretrained(reference_dir, held_out_ids, loaded):
    ref = AutoModelForCausalLM.from_pretrained(reference_dir).eval()  # bfloat16, as stored
    model, handle = loaded(reference_dir, budget=0.25, device="cpu")
    ids = held_out_ids[:200][None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    handle.unpatch()
