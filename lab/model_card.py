"""Measure the reference model and write its card: held-out bits per byte, router entropy and expert usage per layer,
the loss curve. Writes `card.json`, `loss_curve.png` and `README.md` into the model directory.

    python -m lab.model_card examples/reference-moe
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hooks import RoutingRecorder
from lab.figures import figure
from lab.reference import HELD_OUT_FILES
from tests.corpus import corpus_text
from tests.measure import bits_per_byte


def router_stats(model, tokenizer, text: str, seq_len: int = 256) -> list[dict]:
    """Per MoE layer: mean normalised entropy of the router distribution, and each expert's share of top-k picks."""
    ids = torch.tensor(tokenizer(text)["input_ids"][: 32 * seq_len]).view(-1, seq_len)  # [B, T]
    logits_per_layer: list[list[torch.Tensor]] = []
    handles = []
    blocks = RoutingRecorder(model).blocks
    for b in blocks:
        logits_per_layer.append([])
        handles.append(b.router.register_forward_hook(lambda m, a, out, i=b.index: logits_per_layer[i].append(out[0])))
    with RoutingRecorder(model, blocks) as trace, torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    out = []
    for b in blocks:
        probs = torch.cat(logits_per_layer[b.index]).float().softmax(-1)  # [N, E]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(b.num_experts)
        picks = trace.layer_index(b.index).flatten()
        usage = torch.bincount(picks, minlength=b.num_experts).float() / picks.numel()
        usage_entropy = -(usage * usage.clamp_min(1e-12).log()).sum() / math.log(b.num_experts)
        out.append(
            {
                "layer": b.index,
                "router_entropy": round(entropy.mean().item(), 4),  # per token, 1.0 = uniform over experts
                "usage": [round(u, 4) for u in usage.tolist()],
                "usage_entropy": round(usage_entropy.item(), 4),  # of the aggregate load, 1.0 = perfectly balanced
                "skew": skew(usage.tolist()),
            }
        )
    return out


def plot_loss(log: list[dict], path: Path, title: str) -> None:
    steps = [e["step"] + 1 for e in log]
    loss = [e["loss"] for e in log]
    window = 25
    smooth = [
        sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))
    ]
    val = [(e["step"] + 1, e["val_bits_per_byte"]) for e in log if "val_bits_per_byte" in e]
    fig, ax = figure(figsize=(7, 4))
    ax.plot(steps, smooth, label="training loss (nats/token, 25-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax2 = ax.twinx()
    ax2.plot(*zip(*val, strict=True), "o-", color="C1", label="held-out bits/byte (64 KB)")
    ax2.set_ylabel("bits / byte")
    fig.legend(loc="upper right", bbox_to_anchor=(0.86, 0.86))
    ax.set_title(f"{title} training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    args = ap.parse_args()
    d = args.model_dir
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(d)
    log = json.loads((d / "training_log.json").read_text())
    t0 = time.time()
    val_text = corpus_text("val")
    bpb_full = bits_per_byte(model, tokenizer, val_text)
    bpb_train = bits_per_byte(model, tokenizer, corpus_text("train", max_bytes=len(val_text.encode())))
    card = {
        "architecture": architecture(model.config),
        "vocab_size": model.config.vocab_size,
        "parameters": sum(p.numel() for p in model.parameters()),
        "expert_parameters": sum(p.numel() for n, p in model.named_parameters() if ".experts." in n),
        "held_out_files": HELD_OUT_FILES,
        "held_out_bytes": len(val_text.encode()),
        "held_out_bits_per_byte": round(bpb_full, 4),
        "held_out_64k_bits_per_byte": round(bits_per_byte(model, tokenizer, corpus_text("val", max_bytes=64_000)), 4),
        "train_sample_bits_per_byte": round(bpb_train, 4),
        "bytes_per_token": round(len(val_text.encode()) / len(tokenizer(val_text)["input_ids"]), 3),
        "routers": router_stats(model, tokenizer, val_text),
        "train_seconds": round(log["train_seconds"]),
        "training_tokens_seen": log["training_tokens_seen"],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "eval_seconds": round(time.time() - t0, 1),
    }
    (d / "card.json").write_text(json.dumps(card, indent=1))
    plot_loss(log["log"], d / "loss_curve.png", d.name)
    (d / "README.md").write_text(render_card(card, log, d.name))
    print(json.dumps({k: v for k, v in card.items() if k != "routers"}, indent=1))


def architecture(config) -> str:
    """One line describing the model's geometry, for the card."""
    experts = getattr(config, "num_local_experts", None) or config.num_experts
    expert_size = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    shared = getattr(config, "shared_expert_intermediate_size", 0)
    return (f"{type(config).__name__.removesuffix('Config')}: {config.num_hidden_layers} layers, hidden "
            f"{config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} KV heads), "
            f"{experts} routed experts of intermediate size {expert_size} per layer, top-{config.num_experts_per_tok} "
            "routing" + (f", one shared expert of intermediate size {shared}" if shared else "")
            + ", tied embeddings")  # fmt: skip


def skew(usage: list[float]) -> dict:
    """How unevenly the experts are used: the busiest tenth's share, and the busiest / idlest expert over the mean."""
    ranked = sorted(usage, reverse=True)
    mean = sum(usage) / len(usage)
    return {"top_tenth_share": round(sum(ranked[: max(1, len(usage) // 10)]), 4),
            "max_over_mean": round(ranked[0] / mean, 2), "min_over_mean": round(ranked[-1] / mean, 3)}  # fmt: skip


def render_card(card: dict, log: dict, name: str) -> str:
    a = log["args"]
    experts = card["expert_parameters"]
    facts = [
        ("architecture", card["architecture"]),
        ("parameters", f"{card['parameters'] / 1e6:.2f} M, of which experts {experts / 1e6:.2f} M "
         f"({experts / card['parameters']:.0%}); stored in bfloat16"),
        ("tokenizer", f"byte-level BPE, {card['vocab_size']} tokens, trained with `tokenizers` on the training split "
         f"({card['bytes_per_token']} bytes/token on held-out text)"),
        ("data", f"the `.py` files of the standard library of CPython {card['python']} (the interpreter that trained "
         "it), files over 200 kB skipped; held out: every module whose dotted name hashes to bucket 0 of 20 (md5), "
         f"{card['held_out_files']} files, {card['held_out_bytes'] / 1e6:.2f} MB, frozen in "
         "`examples/corpus/heldout.txt` (`lab/reference.py`)"),
        ("training", f"{a['steps']} AdamW steps of {a['batch']} x {a['seq_len']} tokens "
         f"({card['training_tokens_seen'] / 1e6:.1f} M tokens), lr {a['lr']} (warm-up {a['warmup']}, cosine to "
         f"10%), load-balancing loss x {a['aux_loss']}, seed {a['seed']}; "
         f"{card['train_seconds'] / 60:.0f} min on 2 CPU cores (torch {card['torch']})"),
        ("**held-out bits per byte**", f"**{card['held_out_bits_per_byte']:.3f}** (all "
         f"{card['held_out_bytes'] / 1e6:.2f} MB, 256-token windows; the first 64 kB: "
         f"{card['held_out_64k_bits_per_byte']:.4f}); a training sample of the same size: "
         f"{card['train_sample_bits_per_byte']:.3f}"),
    ]  # fmt: skip
    facts = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in facts)
    n_exp = len(card["routers"][0]["usage"])
    few = n_exp <= 8
    head = (f"| layer | router entropy | load entropy | share of picks, experts 0-{n_exp - 1} |\n|---|---|---|---|"
            if few else "| layer | router entropy | load entropy | busiest tenth's share | busiest / mean | "
            "idlest / mean |\n|---|---|---|---|---|---|")  # fmt: skip
    rows = "\n".join(
        f"| {r['layer']} | {r['router_entropy']:.3f} | {r['usage_entropy']:.3f} | "
        + (" ".join(f"{u:.2f}" for u in r["usage"]) if few else
           f"{r['skew']['top_tenth_share']:.2f} | {r['skew']['max_over_mean']:.1f} | {r['skew']['min_over_mean']:.2f}")
        + " |"
        for r in card["routers"]
    )  # fmt: skip
    return f"""# {name}: a reference Mixture-of-Experts model of the offload-moe project

A small model trained from scratch on CPU so that tests and benchmarks have a real, trained MoE model (with
specialised experts) without downloading anything. It loads offline like any hub checkpoint:

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("examples/{name}", dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained("examples/{name}")
```

{facts}

Reproduce: `make reference-model` (trains both reference models, then runs `python -m lab.model_card`, which measured
every number here; `tests/test_reference_model.py` recomputes the routing table and the 64 kB figure).

## Loss curve

![loss curve](loss_curve.png)

## Routing (measured on {32 * 256} held-out tokens)

Router entropy: mean over tokens of the entropy of the router's softmax, divided by log {n_exp} (1.0 = uniform; low =
each token has clear favourites). Load entropy: entropy of the experts' share of top-k picks, divided by log {n_exp}
(1.0 = perfectly balanced load). Experts specialise when the first is well below 1 while the second stays near 1.

{head}
{rows}
"""


if __name__ == "__main__":
    main()
