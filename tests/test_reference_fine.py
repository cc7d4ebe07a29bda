"""The fine-grained reference model (Qwen2-MoE: 64 experts, top-6, one shared expert): loads offline, offloading
it is lossless with the shared expert left resident, and both models' cards are reproduced by the card script."""

import json

import pytest
import torch
from transformers import Qwen2MoeForCausalLM

from tests.corpus import corpus_text
from tests.helpers import FINE_MODEL_DIR, REFERENCE_MODEL_DIR, load_reference
from tests.measure import bits_per_byte


@pytest.fixture(scope="module")
def fine(fine_dir):
    return load_reference(fine_dir)


def test_loads_offline_in_the_fine_grained_geometry(fine, fine_dir):
    model, tokenizer = fine
    assert isinstance(model, Qwen2MoeForCausalLM)
    cfg = model.config
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size) == (64, 6, 96)
    text = "def f(x):\n    return x + 1\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    size = sum(p.stat().st_size for p in fine_dir.iterdir() if p.is_file())
    assert size <= 12 * 2**20, f"{size / 2**20:.1f} MiB"


@pytest.mark.parametrize("impl", ["eager", "grouped_mm"])
@pytest.mark.parametrize("budget", [0.125, 0.5])
def test_offloading_the_fine_model_is_lossless_and_keeps_the_shared_expert(fine, budget, impl, patched):
    """Float32 rounding only, and the same generated tokens: a token's six expert outputs are added in the order
    their slots come (with two experts, as in Mixtral, the order cannot change the sum; with six it can), below one
    layer's experts (1/8: 48 slots for 64) a layer runs in waves that each add a partial sum, and grouped_mm's CPU
    kernel blocks rows by group offsets, which move with the slots. Which experts share a pass also depends on when
    their copies land (thread timing), so the bound is a few float32 ulps of the logits, not one."""
    model, tokenizer = fine
    model.set_experts_implementation(impl)
    ids = torch.tensor(tokenizer(corpus_text("val", max_bytes=4000))["input_ids"])
    prompt, batch = ids[:400][None], torch.stack([ids[400:440], ids[500:540]])
    shared = {n: p for n, p in model.named_parameters() if "shared_expert" in n}
    with torch.no_grad():
        ref_logits = model(prompt).logits
        ref_tokens = model.generate(batch, max_new_tokens=10, do_sample=False)
    handle = patched(model, budget=budget, device="cpu")
    try:
        with torch.no_grad():
            logits = model(prompt).logits
            torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=5e-5)
            assert torch.equal(model.generate(batch, max_new_tokens=10, do_sample=False), ref_tokens)
        stats = handle.stats()
        assert stats.resident_bytes <= stats.budget_bytes and stats.misses > 0
        assert (stats.waves > 0) == (budget == 0.125)
        assert stats.slots == pytest.approx(budget * 6 * 64, abs=1)  # slots hold routed experts only
        assert {n: p for n, p in model.named_parameters() if "shared_expert" in n} == shared  # untouched, resident
    finally:
        handle.unpatch()
        model.set_experts_implementation("grouped_mm")


@pytest.mark.bench
@pytest.mark.parametrize("model_dir", [REFERENCE_MODEL_DIR, FINE_MODEL_DIR], ids=["mixtral", "fine"])
def test_card_numbers_are_reproduced_by_the_card_script(model_dir):
    """The routing table (router and load entropy, usage skew per layer) and the 64 kB held-out bits per byte."""
    from lab import model_card

    card = json.loads((model_dir / "card.json").read_text())
    model, tokenizer = load_reference(model_dir)
    text = corpus_text("val", max_bytes=64_000)  # the card's routing table reads the first 8192 tokens of it
    assert bits_per_byte(model, tokenizer, text) == pytest.approx(card["held_out_64k_bits_per_byte"], abs=2e-4)
    for ours, theirs in zip(model_card.router_stats(model, tokenizer, text), card["routers"], strict=True):
        assert ours["router_entropy"] == pytest.approx(theirs["router_entropy"], abs=2e-4)
        assert ours["usage_entropy"] == pytest.approx(theirs["usage_entropy"], abs=2e-4)
        assert ours["skew"]["top_tenth_share"] == pytest.approx(theirs["skew"]["top_tenth_share"], abs=2e-4)
