"""Low-bit stand-ins: quantisation error per bit width, 8-bit close to lossless, stand-in bytes inside the budget,
deterministic calibration, clear errors."""

import pytest
import torch

import offload_moe
from offload_moe.blocks import expert_geometry, moe_blocks
from offload_moe.calibration import load_calibration
from offload_moe.options import OffloadOptions
from offload_moe.plan import make_plan
from offload_moe.standins.catalog import quant_expert_bytes
from offload_moe.standins.quant import pack, quant_bytes, quantize, unpack
from tests.corpus import corpus_text
from tests.helpers import load_reference, tiny_model
from tests.measure import bits_per_byte

# relative Frobenius error of a Gaussian matrix, group 64, asymmetric min-max: (max - min) / (2^b - 1) / sqrt(12)
# over a group's spread of ~4.6 sigma gives 2-bit ~0.44, 3-bit ~0.19, 4-bit ~0.089, 8-bit ~0.0052; bounds with margin
BOUNDS = {2: 0.50, 3: 0.22, 4: 0.10, 8: 0.006}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantise_dequantise_error_bound_and_packed_size(bits):
    torch.manual_seed(0)
    w = torch.randn(96, 256)
    q = quantize(w, bits, group=64)
    err = float((q.dequantize() - w).norm() / w.norm())
    assert err <= BOUNDS[bits]
    if bits < 8:
        assert err > BOUNDS[bits * 2 if bits * 2 in BOUNDS else 8]  # fewer bits: really coarser
    assert q.nbytes == quant_bytes(tuple(w.shape), bits, 64)
    assert q.nbytes <= w.numel() * bits / 8 + (w.numel() // 64) * 4  # codes at their width + fp16 scale and zero
    optimised = float((quantize(w, bits, group=64, optimize=True).dequantize() - w).norm() / w.norm())
    assert optimised <= err * 1.001  # HQQ's zero refinement never makes it worse


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_round_trip(bits):
    codes = torch.randint(0, 2**bits, (1001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    packed = pack(codes, bits)
    assert packed.numel() == -(-1001 * bits // 8)
    assert torch.equal(unpack(packed, bits, 1001), codes)


def test_unsupported_bit_widths_are_refused(patched):
    with pytest.raises(ValueError, match=r"bits=5 is not supported; choose one of \[2, 3, 4, 8\]"):
        quantize(torch.randn(4, 64), 5)
    with pytest.raises(ValueError, match=r"bits=1 is not supported"):
        patched(tiny_model("mixtral"), budget=0.5, device="cpu", standin="quant", bits=1)
    with pytest.raises(ValueError, match="group_size"):
        patched(tiny_model("mixtral"), budget=0.5, device="cpu", standin="quant", group_size=0)


@pytest.fixture(scope="module")
def reference(reference_dir):
    return load_reference(reference_dir)


HELD_OUT = 1500  # bytes of held-out text the accuracy tests decode


@pytest.fixture(scope="module")
def exact_bpb(reference):
    """The unpatched reference model's bits per byte on the held-out text, decoded one token at a time."""
    model, tokenizer = reference
    return bits_per_byte(model, tokenizer, corpus_text("val", max_bytes=HELD_OUT), decode=True)


@pytest.mark.slow
def test_8_bit_standins_are_nearly_lossless_and_inside_the_budget(reference, exact_bpb, patched):
    """Every miss served by an 8-bit copy (critical_weight 1.01: none fetched): within 0.3% of the exact bits per
    byte, while 2-bit copies cost more; the stand-ins and the slot pool fit the budget."""
    model, tokenizer = reference
    text, base = corpus_text("val", max_bytes=HELD_OUT), exact_bpb
    bpb = {}
    for bits in (8, 2):
        handle = patched(model, budget=0.75, device="cpu", standin="quant", bits=bits, critical_weight=1.01)
        try:
            bpb[bits] = bits_per_byte(model, tokenizer, text, decode=True)
            s = handle.stats()
            assert s.substituted > 0 and s.standin_bytes > 0
            assert s.resident_bytes <= s.budget_bytes
        finally:
            handle.unpatch()
    assert abs(bpb[8] / base - 1) < 0.003
    assert bpb[2] > bpb[8]


@pytest.mark.slow
def test_calibration_gives_the_same_file_twice(reference, tmp_path):
    model, tokenizer = reference
    text = [corpus_text("train", max_bytes=3000)]
    paths = []
    for i in range(2):
        torch.manual_seed(0)
        paths.append(tmp_path / f"cal{i}.safetensors")
        offload_moe.calibrate(model, text, tokenizer, path=paths[-1], max_tokens=512, seq_len=128)
    a, b = (load_calibration(p) for p in paths)
    assert torch.equal(a.buddies, b.buddies)
    assert a.meta == b.meta and torch.equal(a.standin_errors, b.standin_errors)
    assert torch.equal(a.frequencies, b.frequencies) and torch.equal(a.tau, b.tau)
    for n in a.standins.u:
        assert torch.equal(a.standins.u[n], b.standins.u[n]) and torch.equal(a.standins.v[n], b.standins.v[n])


@pytest.mark.slow
def test_lowbit_copies_cross_the_link_at_their_packed_size(reference, exact_bpb, patched):
    """standin="lowbit" (HOBBIT): nothing resident besides the slots; each non-critical miss copies the expert's
    4-bit copy (28% of its bf16 bytes) and uses it at once; the real expert follows in idle link time."""
    model, tokenizer = reference
    text, base = corpus_text("val", max_bytes=HELD_OUT), exact_bpb
    handle = patched(model, budget=0.25, device="cpu", standin="lowbit", bits=4, critical_weight=1.01,
                               prefetch=None, miss_path="fetch")  # fmt: skip
    try:
        bpb = bits_per_byte(model, tokenizer, text, decode=True)
        s = handle.stats()
    finally:
        handle.unpatch()
    plain = make_plan(expert_geometry(moe_blocks(model)), 0.25, OffloadOptions())
    assert s.standin_bytes == 0 and s.slots == plain.slots  # the whole budget stays slots
    assert s.lowbit_copies > 0 and s.substituted >= s.lowbit_copies
    lowbit = quant_expert_bytes(expert_geometry(moe_blocks(model)), 4, 64)
    assert s.bytes_copied == s.copies * s.expert_bytes + s.lowbit_copies * lowbit
    assert lowbit <= 0.3 * s.expert_bytes / 2  # codes, scales, zeros (groups padded) over the bf16 bytes
    assert abs(bpb / base - 1) < 0.03
