"""Models with the routing shapes of the MoE models people run, at tiny dims and random weights, built in seconds.

The layer count, experts per layer, top-k, shared experts and grouped routing are the real models'; hidden size 256
and expert intermediate size 64 keep compute small, so what a run measures is the offload runtime's own cost at the
scale of the real routing. Nothing is downloaded: the configs are written here from the models' published configs.
"""

from __future__ import annotations

import torch
from transformers import (
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

HIDDEN, EXPERT_INTERMEDIATE, VOCAB = 256, 64, 1024
EMBEDDING_SCALE = 30.0  # see `scale_model(spread=True)`
_ATTENTION = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)


def _mixtral() -> torch.nn.Module:  # Mixtral-8x7B: 32 layers x 8 experts, top-2
    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=EXPERT_INTERMEDIATE,
                        num_hidden_layers=32, num_local_experts=8, num_experts_per_tok=2, **_ATTENTION)  # fmt: skip
    return MixtralForCausalLM(cfg)


def _qwen3() -> torch.nn.Module:  # Qwen3-30B-A3B: 48 layers x 128 experts, top-8
    cfg = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                         moe_intermediate_size=EXPERT_INTERMEDIATE, num_hidden_layers=48, num_experts=128,
                         num_experts_per_tok=8, norm_topk_prob=True, **_ATTENTION)  # fmt: skip
    return Qwen3MoeForCausalLM(cfg)


def _gpt_oss() -> torch.nn.Module:  # gpt-oss-120b: 36 layers x 128 experts, top-4, alternating sliding attention
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=EXPERT_INTERMEDIATE,
                       num_hidden_layers=36, num_local_experts=128, num_experts_per_tok=4, sliding_window=128,
                       rope_parameters={"rope_type": "default", "rope_theta": 150000.0}, **_ATTENTION)  # fmt: skip
    return GptOssForCausalLM(cfg)


def _deepseek_v3() -> torch.nn.Module:
    """DeepSeek-V3: 61 layers, the first 3 dense, then 58 MoE layers of 256 routed experts (top-8, grouped routing: 8
    groups, 4 chosen) plus one shared expert; multi-head latent attention at tiny ranks, plain RoPE (the real
    model's YaRN scaling is for contexts these models never see)."""
    cfg = DeepseekV3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN,
                           moe_intermediate_size=EXPERT_INTERMEDIATE, num_hidden_layers=61, first_k_dense_replace=3,
                           n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
                           qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=1024,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})  # fmt: skip
    return DeepseekV3ForCausalLM(cfg)


SHAPES = {"mixtral-8x7b": _mixtral, "qwen3-30b-a3b": _qwen3, "gpt-oss-120b": _gpt_oss, "deepseek-v3": _deepseek_v3}


def scale_model(
    shape: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, spread: bool = False
) -> torch.nn.Module:
    """The model of routing shape `shape` (one of `SHAPES`), random weights from `seed`, in eval mode.

    spread: token embeddings scaled up by `EMBEDDING_SCALE`, so each token's routing follows the token, spread over
    the experts as a trained model's is. Without it the attention output, much the same for every token, dominates
    the residual stream of these random models and most tokens go to the same few experts (hit rates near 0.9 at a
    quarter of the experts resident)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown routing shape {shape!r}; choose one of {sorted(SHAPES)}")
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = SHAPES[shape]()
    if spread:
        spread_routing(model)
    return model.to(dtype).eval()


@torch.no_grad()
def spread_routing(model: torch.nn.Module) -> None:
    """Scale `model`'s token embeddings by `EMBEDDING_SCALE` in place: what `scale_model(spread=True)` does before
    the cast to its dtype (after a bf16 cast the scaled weights may differ in the last bit; routing is alike)."""
    model.get_input_embeddings().weight.mul_(EMBEDDING_SCALE)
