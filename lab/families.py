"""Every Mixture-of-Experts family of the installed transformers, found in transformers itself (causal-LM model
types whose modeling module defines an experts class), each buildable as a tiny random model, and checked: patched
with the default options at two budgets, are its logits the unpatched model's?

    python -m lab.families            # the table of the README's supported models
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import warnings
from dataclasses import dataclass

import torch

TINY = {  # attribute -> value, applied where the family's config has the attribute
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 64, "moe_intermediate_size": 32,
    "expert_intermediate_size": 32, "ffn_hidden_size": 64, "shared_intermediate_size": 32,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "n_shared_experts": 1, "num_shared_experts": 1, "shared_expert_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8, "v_head_dim": 16, "n_group": 1, "topk_group": 1, "num_expert_groups": 1,
    "first_k_dense_replace": 1, "num_dense_layers": 1, "sliding_window": 64, "linear_num_value_heads": 2,
    "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16, "mamba_num_heads": 4,
    "mamba_n_heads": 4, "mamba_head_dim": 16, "mamba_d_head": 16, "ssm_state_size": 16, "mamba_d_state": 16,
    "n_groups": 1, "mamba_n_groups": 1, "index_n_heads": 2, "index_head_dim": 16, "index_topk": 8,
    "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "router_hidden_size": 32,
    "ple_embed_dim": 64, "ngram_vocab_size_base": 256, "d_model": 64, "n_heads": 4,
}  # fmt: skip
LAYER_COUNTS = ("num_hidden_layers", "n_layers", "num_layers")
EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K = ("num_experts_per_tok", "moe_topk", "moe_k", "moe_top_k")
CONFIG_TWEAKS = {  # where a generic shrink cannot know a valid per-layer pattern
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "granitemoehybrid": {"layer_types": ["mamba", "attention", "mamba", "attention"], "mamba_d_head": 32},
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv", "full_attention"]},
    "longcat_flash": {"zero_expert_num": 2},
    "qwen4_exp": {"indexer_budget": 8, "indexer_compress_ratio": 4},
    "dbrx": {"d_model": 64, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},  # defaults fail
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2}},
}  # fmt: skip


def moe_families() -> list[str]:
    """Causal-LM model types of the installed transformers whose modeling module defines an experts class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except Exception:  # noqa: S112 (a family that does not import here has no experts to find)
            continue
        if any(name.endswith("Experts") and inspect.isclass(obj) for name, obj in vars(module).items()):
            out.append(model_type)
    return out


def _shrink_pattern(seq, n: int):
    """The first n entries of a per-layer pattern, with every kind of the full pattern kept (the last ones)."""
    head = list(seq[:n])
    missing = [kind for kind in dict.fromkeys(seq) if kind not in head][:n]
    for i, kind in enumerate(missing):
        head[n - 1 - i] = kind
    return "".join(head) if isinstance(seq, str) else type(seq)(head)


def _readable(config, key: str) -> bool:
    """The config has a global value for `key` (per-layer attributes of heterogeneous configs raise on access)."""
    try:
        getattr(config, key)
    except AttributeError:
        return False
    return True


def tiny_config(model_type: str, layers: int = 4, experts: int = 8, top_k: int = 2):
    """The family's default config shrunk to a tiny model: `layers` layers, `experts` experts, `top_k` routed."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    text = default.get_text_config()
    old_layers = next((getattr(text, k) for k in LAYER_COUNTS if isinstance(getattr(text, k, None), int)), None)
    settable = lambda k: _readable(text, k) and not isinstance(getattr(text, k), bool)  # noqa: E731
    over = {k: v for k, v in TINY.items() if settable(k) and isinstance(getattr(text, k), int | type(None))}
    over.update({k: layers for k in LAYER_COUNTS if settable(k)})
    over.update({k: min(getattr(text, k) or experts, experts) for k in EXPERT_COUNTS if settable(k)})
    over.update({k: min(getattr(text, k) or top_k, top_k) for k in TOP_K if settable(k)})
    if "qk_rope_head_dim" in over and "head_dim" in over:  # MLA: rotary embeddings span the rope part of a head
        over["head_dim"] = over["qk_rope_head_dim"]
    if "kv_lora_rank" in over and "num_key_value_heads" in over:  # MLA attends with every head's own keys
        over["num_key_value_heads"] = over["num_attention_heads"]
    for k, v in vars(text).items():
        if k.startswith("_") or not old_layers or not isinstance(v, list | tuple | str) or len(v) != old_layers:
            continue
        if list(v) == list(range(old_layers)):  # an index list of every layer, not a pattern
            over[k] = type(v)(range(layers))
        else:
            over[k] = _shrink_pattern(v, layers)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(text, k, None)
        if isinstance(v, int) and v >= over.get("vocab_size", v + 1):
            over[k] = 1
        elif isinstance(v, list):
            over[k] = [min(x, 1) for x in v]
    for k, v in CONFIG_TWEAKS.get(model_type, {}).items():
        over[k] = {**getattr(text, k).to_dict(), **v} if isinstance(v, dict) else v
    if text is default:
        return cls(**over)
    key = next(k for k, v in vars(default).items() if v is text)  # a multimodal config: shrink its text model
    return cls(**{**default.to_dict(), key: {**text.to_dict(), **over}})


def tiny_model(model_type: str, seed: int = 0) -> torch.nn.Module:
    """A float32 tiny random model of the family, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(tiny_config(model_type)).float().eval()


@dataclass(frozen=True)
class FamilyCheck:
    model_type: str
    status: str  # "lossless", "unsupported" (offload-moe refuses it, saying why) or "unbuildable" (on this CPU)
    detail: str  # the largest logit difference, or the reason


def check_family(model_type: str, budgets: tuple[float, ...] = (0.25, 0.5)) -> FamilyCheck:
    """Build a tiny model of the family, patch it with the default options at each budget, compare logits."""
    import offload_moe

    try:
        model = tiny_model(model_type)
        ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(ids).logits
    except Exception as e:  # the family itself does not build or run tiny on this machine
        return FamilyCheck(model_type, "unbuildable", f"{type(e).__name__}: {e}".splitlines()[0][:160])
    worst = 0.0
    for budget in budgets:
        try:
            handle = offload_moe.patch(model, budget=budget, device="cpu")
        except offload_moe.UnsupportedModelError as e:
            return FamilyCheck(model_type, "unsupported", str(e))
        try:
            with torch.no_grad():
                worst = max(worst, float((model(ids).logits - ref).abs().max()))
        finally:
            handle.unpatch()
    return FamilyCheck(model_type, "lossless" if worst <= 1e-5 else "differs", f"{worst:.1e}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Check every MoE family of the installed transformers.")
    ap.add_argument("families", nargs="*", help="model types (default: all)")
    args = ap.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    print(f"transformers {transformers.__version__}: tiny random models, patched at budgets 0.25 and 0.5\n")
    print("| family | result |\n|---|---|")
    for model_type in args.families or moe_families():
        check = check_family(model_type)
        print(f"| {model_type} | {check.status}: {check.detail} |", flush=True)


if __name__ == "__main__":
    main()
