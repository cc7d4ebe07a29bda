"""Shared test helpers: tiny seeded MoE models of each supported family (built in memory, nothing downloaded), the
reference models, logits and greedy decoding; a small simulated engine and backlogged workloads for the schedulers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from fairness import EngineModel, Request

REPO = Path(__file__).resolve().parent.parent  # the tests run from a checkout of the repository
REFERENCE_MODEL_DIR = REPO / "examples" / "reference-moe"
FINE_MODEL_DIR = REPO / "examples" / "reference-moe-fine"  # 64 fine-grained experts, top-6, one shared expert

COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised float32 model of `family` with 8 experts per layer."""
    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2)
        model = MixtralForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=4,
            head_dim=8,
            norm_topk_prob=True,
        )
        model = Qwen3MoeForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = Qwen2MoeConfig(
            **COMMON,
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=8,
            num_experts_per_tok=2,
        )
        model = Qwen2MoeForCausalLM(cfg)
    elif family == "olmoe":
        cfg = OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
        model = OlmoeForCausalLM(cfg)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe"]

# every lossless, miss-path and transfer test runs on each device present; CUDA ones skip cleanly without a GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]


def tiny_dense_model() -> torch.nn.Module:
    """A model with no MoE block at all, to check that it is refused."""
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)  # fmt: skip
    return LlamaForCausalLM(cfg)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def generate(model: torch.nn.Module, ids: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Greedy decoding of `n` new tokens."""
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


def load_reference(path: Path, dtype: torch.dtype = torch.float32):
    """A reference model (float32 by default: exact comparisons on this CPU) and its tokenizer."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


SMALL = EngineModel(kv_tokens=4000, max_step_tokens=512, max_running=64)  # a small simulated engine


@st.composite
def backlogged_workloads(draw):
    """2-4 clients with random (over-capacity) rates and request sizes, for 60 s."""
    n = draw(st.integers(2, 4))
    reqs = []
    for c in range(n):
        rate = draw(st.floats(0.5, 6.0))
        n_in, n_out = draw(st.integers(8, 600)), draw(st.integers(8, 600))
        step, t = 1.0 / rate, draw(st.floats(0, 1))
        while t < 60:
            reqs.append(Request(f"c{c}", t, n_in, n_out))
            t += step
    return reqs
