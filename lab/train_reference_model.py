"""Train a reference MoE model on the running interpreter's stdlib source: the Mixtral-shaped one (8 experts, top-2)
or the fine-grained one (Qwen2-MoE: 64 small experts, top-6, one shared expert).

Seeded and reproducible (same interpreter, same torch): BPE tokenizer from `tokenizers` (or the first model's, with
--tokenizer), then a fixed number of AdamW steps on random windows of the training split. Writes a normal model
directory that `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` load offline, plus
`training_log.json`.

    python -m lab.train_reference_model --out examples/reference-moe     # about 35-45 min on 2 CPU cores
    python -m lab.train_reference_model --family qwen2_moe --experts 64 --top-k 6 --intermediate 24 \
        --shared-intermediate 96 --layers 6 --steps 1500 --tokenizer examples/reference-moe \
        --out examples/reference-moe-fine
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from lab.reference import read_source, stdlib_files
from tests.corpus import corpus_text
from tests.measure import bits_per_byte

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on the training split only (byte-level: any text encodes, nothing is unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((read_source(p) for p in stdlib_files("train")), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS, pad_token=EOS)


def encode_split(tokenizer: PreTrainedTokenizerFast, split: str) -> torch.Tensor:
    """All files of a split as one stream of token ids, files separated by EOS."""
    ids: list[int] = []
    for p in stdlib_files(split):
        ids.extend(tokenizer(read_source(p))["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def make_model(vocab_size: int, args: argparse.Namespace) -> torch.nn.Module:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        router_aux_loss_coef=args.aux_loss,
        output_router_logits=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    if args.family == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**common, intermediate_size=args.intermediate,
                                                num_local_experts=args.experts))  # fmt: skip
    config = Qwen2MoeConfig(
        **common,
        intermediate_size=4 * args.hidden,  # dense MLP size; every layer is an MoE layer here
        moe_intermediate_size=args.intermediate,
        shared_expert_intermediate_size=args.shared_intermediate,
        num_experts=args.experts,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    return Qwen2MoeForCausalLM(config)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "reference-moe")
    ap.add_argument("--family", choices=["mixtral", "qwen2_moe"], default="mixtral")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--shared-intermediate", type=int, default=0, help="qwen2_moe: the shared expert's size")
    ap.add_argument("--tokenizer", type=Path, default=None, help="reuse this model directory's tokenizer")
    ap.add_argument("--experts-impl", default="eager", help="experts kernel during training (grouped_mm is faster)")
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=160)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--aux-loss", type=float, default=0.02)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else train_tokenizer(args.vocab)
    train_ids = encode_split(tokenizer, "train")
    val_text = corpus_text("val", max_bytes=64_000)  # quick validation during training; the card uses more
    print(f"tokenizer + encoding: {time.time() - t0:.0f}s, {train_ids.numel():,} training tokens", flush=True)

    model = make_model(len(tokenizer), args)
    model.set_experts_implementation(args.experts_impl)
    model.config.output_router_logits = True  # adds Mixtral's load-balancing loss to the training loss
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    log: list[dict] = []
    t_train = time.time()
    for step in range(args.steps):
        starts = torch.randint(0, train_ids.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train_ids[s : s + args.seq_len + 1] for s in starts.tolist()])  # [B, T+1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        model.train()
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        entry = {"step": step, "loss": out.loss.item(), "aux_loss": out.aux_loss.item(), "s": time.time() - t_train}
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            entry["val_bits_per_byte"] = bits_per_byte(model, tokenizer, val_text, seq_len=args.seq_len)
            print(
                f"step {step + 1}/{args.steps} loss {entry['loss']:.3f} val bpb {entry['val_bits_per_byte']:.3f} "
                f"({entry['s']:.0f}s)",
                flush=True,
            )
        log.append(entry)

    model.config.output_router_logits = False
    model.set_experts_implementation("eager")
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out)  # bf16 on disk keeps the directory under 12 MB
    tokenizer.save_pretrained(args.out)
    meta = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    summary = {
        "args": meta,
        "parameters": n_params,
        "training_tokens_seen": args.steps * args.batch * args.seq_len,
        "training_split_tokens": train_ids.numel(),
        "train_seconds": time.time() - t_train,
        "torch": torch.__version__,
        "log": log,
    }
    (args.out / "training_log.json").write_text(json.dumps(summary))
    print(f"saved to {args.out} in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
