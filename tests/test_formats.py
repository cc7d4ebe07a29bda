"""Checkpoints in their own low-bit format (MXFP4, FP8 block scales, int4/int8 pack-quantized): `load` keeps the
experts packed, copies packed bytes, and computes exactly what the model computes with the same weights dequantized.

The checkpoints are written by `tests.quantize` from each format's public definition. The reference for MXFP4 and FP8
is transformers' own path: `from_pretrained` of the same low-bit checkpoint, which dequantizes on this CPU. For the
int formats (transformers needs the compressed-tensors package for them) it is `from_pretrained` of the dequantized
weights saved plain.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

import offload_moe
from offload_moe.errors import UnsupportedModelError
from offload_moe.packed_checkpoint import CheckpointError
from tests.helpers import generate, logits, tiny_model
from tests.quantize import save_quantized

ATTENTION = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, max_position_embeddings=256)  # fmt: skip


def _model(family: str) -> torch.nn.Module:
    """bf16 models with 8 experts whose matrices' sides are multiples of 32 (MXFP4 blocks, int groups of 32)."""
    torch.manual_seed(0)
    if family == "gpt_oss":
        cfg = GptOssConfig(**ATTENTION, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2,
                           sliding_window=32)  # fmt: skip
        model = GptOssForCausalLM(cfg)
    elif family == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**ATTENTION, intermediate_size=96, num_local_experts=8))
    else:
        cfg = Qwen3MoeConfig(**ATTENTION, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                             num_experts_per_tok=4, norm_topk_prob=True)  # fmt: skip
        model = Qwen3MoeForCausalLM(cfg)
    return model.to(torch.bfloat16).eval()


CASES = [("gpt_oss", "mxfp4"), ("mixtral", "fp8"), ("qwen3_moe", "fp8"), ("mixtral", "int4"), ("qwen3_moe", "int8")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{q}" for f, q in CASES])
def checkpoint(request, tmp_path_factory):
    """(low-bit checkpoint dir, reference model, expert bytes per expert as stored)."""
    family, fmt = request.param
    path = tmp_path_factory.mktemp(f"{family}-{fmt}")
    model = _model(family)
    packed_bytes = save_quantized(model, path / "packed", fmt, group=32)
    if fmt in ("mxfp4", "fp8"):  # transformers dequantizes these itself on a CPU
        ref = AutoModelForCausalLM.from_pretrained(path / "packed")
    else:
        model.save_pretrained(path / "dequantized")
        ref = AutoModelForCausalLM.from_pretrained(path / "dequantized")
    assert ref.dtype == torch.bfloat16
    n_experts = model.config.num_hidden_layers * 8
    return path / "packed", ref.eval(), packed_bytes // n_experts, fmt


@pytest.mark.parametrize(
    "budget, options",
    [(1.0, {}), (0.5, {"miss_path": "fetch"}), (0.25, {"miss_path": "host"}), (0.5, {"miss_path": "auto"})],
    ids=["resident", "fetch", "host", "auto"],
)
def test_packed_experts_compute_what_the_dequantized_model_computes(checkpoint, budget, options, loaded):
    path, ref, _, _ = checkpoint
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    model, handle = loaded(path, budget=budget, device="cpu", **options)
    assert model.dtype == torch.bfloat16
    assert torch.equal(logits(model, ids), logits(ref, ids))
    assert torch.equal(generate(model, ids[:1, :8], 6), generate(ref, ids[:1, :8], 6))
    if budget < 1:
        assert handle.stats().misses > 0


def test_copies_and_the_budget_count_packed_bytes(checkpoint, loaded):
    path, _, packed_bytes, fmt = checkpoint
    model, handle = loaded(path, budget=0.5, device="cpu", read="pread", ram_budget=1.0)
    generate(model, torch.randint(0, 128, (1, 8)), 4)
    s = handle.stats()
    assert s.copies > 0 and s.bytes_copied == s.copies * packed_bytes  # each copy moves the packed expert
    assert s.expert_bytes == packed_bytes
    assert s.resident_bytes <= 0.5 * packed_bytes * 16 + packed_bytes
    assert s.ram_bytes == packed_bytes * 16  # the RAM tier holds packed experts too
    dense = 3 * 64 * (64 if fmt == "mxfp4" else 96 if "mixtral" in str(path) else 64) * 2
    assert packed_bytes < 0.6 * dense


def test_mxfp4_copy_is_4_25_bits_per_weight(tmp_path, loaded):
    model = _model("gpt_oss")
    save_quantized(model, tmp_path, "mxfp4")
    _, handle = loaded(tmp_path, budget=0.5, device="cpu")
    weights = 3 * 64 * 64  # gate_up [128, 64] and down [64, 64]
    biases = (128 + 64) * 2  # bf16, kept plain
    assert handle.stats().expert_bytes == weights * 4.25 / 8 + biases


def test_standins_work_on_packed_experts(checkpoint, loaded):
    path, ref, _, _ = checkpoint
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    model, handle = loaded(path, budget=1.0, device="cpu", standin="quant", bits=2, group_size=32)
    got, want = logits(model, ids), logits(ref, ids)
    assert handle.stats().substituted > 0
    assert (got - want).abs().max() < 0.3 * want.abs().max()  # 2-bit stand-ins: 0.03-0.18 measured here


def _damage(path, key, fn):
    tensors = load_file(path / "model.safetensors")
    tensors[key] = fn(tensors[key])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    "fmt, key, damage, says",
    [
        ("mxfp4", "model.layers.1.mlp.experts.down_proj_scales", lambda t: t[..., :-1].contiguous(), "uint8"),
        ("mxfp4", "model.layers.0.mlp.experts.gate_up_proj_scales", lambda t: t.fill_(255), "NaN"),
        ("fp8", "model.layers.0.mlp.experts.3.up_proj.weight_scale_inv", lambda t: t * float("nan"), "finite"),
        ("fp8", "model.layers.1.self_attn.q_proj.weight", lambda t: t.float(), "float8_e4m3fn"),
        ("int4", "model.layers.0.mlp.experts.5.down_proj.weight_packed", lambda t: t[:-1].contiguous(), "int32"),
    ],
)
def test_a_damaged_tensor_is_named_with_its_file(tmp_path, fmt, key, damage, says):
    save_quantized(_model("qwen3_moe" if fmt != "mxfp4" else "gpt_oss"), tmp_path, fmt, group=32)
    _damage(tmp_path, key, damage)
    with pytest.raises(CheckpointError, match=str(tmp_path / "model.safetensors")) as e:
        offload_moe.load(tmp_path, budget=0.5, device="cpu")
    assert key in str(e.value) and says in str(e.value)


def test_an_unknown_format_is_refused_with_the_tensors_found(tmp_path):
    save_quantized(_model("qwen3_moe"), tmp_path, "int4", group=32)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="awq") as e:
        offload_moe.load(tmp_path, budget=0.5, device="cpu")
    assert "model.layers.*.mlp.experts.*.down_proj.weight_packed" in str(e.value) and "mxfp4" in str(e.value)


def test_low_bit_experts_without_a_quantization_config_are_refused(tmp_path):
    save_quantized(_model("gpt_oss"), tmp_path, "mxfp4")
    config = json.loads((tmp_path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gate_up_proj_blocks"):
        offload_moe.load(tmp_path, budget=0.5, device="cpu")


def test_patch_refuses_packed_experts_and_points_to_load(patched):
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        e = layer.mlp.experts
        e.gate_up_proj = torch.nn.Parameter(torch.zeros(e.gate_up_proj.shape, dtype=torch.uint8), requires_grad=False)
    with pytest.raises(UnsupportedModelError, match="offload_moe.load"):
        patched(model, budget=0.5, device="cpu")


def test_host_precision_is_refused_for_packed_experts(tmp_path):
    save_quantized(_model("mixtral"), tmp_path, "int4", group=32)
    with pytest.raises(ValueError, match="already stores them low-bit"):
        offload_moe.load(tmp_path, budget=0.25, device="cpu", miss_path="host", host_precision="int8")


def test_host_costs_of_packed_experts_are_cached_apart_from_plain_ones(tmp_path, monkeypatch, loaded, patched):
    """Host compute of a packed expert decodes it first: its measured cost must not stand for plain experts of the
    same shapes (nor theirs for it)."""
    monkeypatch.setenv("OFFLOAD_MOE_CACHE_DIR", str(tmp_path / "cache"))
    model = _model("mixtral")
    save_quantized(model, tmp_path / "packed", "int4", group=32)
    loaded(tmp_path / "packed", budget=0.5, device="cpu", miss_path="auto")
    patched(model, budget=0.5, device="cpu", miss_path="auto")  # the same weights, plain, same shapes and dtype
    assert len(json.loads((tmp_path / "cache" / "host_costs.json").read_text())) == 2
