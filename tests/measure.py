"""Bits per byte of a causal LM on a text: the accuracy measure used by the tests and the benchmark."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache


@torch.no_grad()
def bits_per_byte(
    model: torch.nn.Module,
    tokenizer,
    text: str,
    seq_len: int = 256,
    batch_size: int = 8,
    decode: bool = False,
    static_cache: bool = False,
) -> float:
    """Cross-entropy of every token but the first, in bits, divided by the text's UTF-8 bytes.

    The token stream is cut into windows of `seq_len` predictions that overlap by one token, so each token after
    the first is predicted exactly once, with up to `seq_len` tokens of context. decode=True feeds each window one
    token at a time through the KV cache, as generation does, so an offloaded model sees the misses of decoding
    (a whole-window forward routes every token at once, which is prefill). static_cache: decode through a
    `StaticCache` of `seq_len` positions (fixed shapes, as a compiled model needs).
    """
    n_bytes = len(text.encode("utf-8"))
    if n_bytes == 0:
        raise ValueError("bits_per_byte needs a non-empty text")
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)  # [N]
    if ids.numel() < 2:
        raise ValueError("bits_per_byte needs a text of at least two tokens")
    device = next(model.parameters()).device
    windows = [ids[s : s + seq_len + 1] for s in range(0, ids.numel() - 1, seq_len)]
    total_nats = 0.0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        # The last window may be short: run same-length windows together.
        for group in _same_length_groups(chunk):
            batch = torch.stack(group).to(device)  # [B, T+1]
            if decode:
                logits = decode_logits(model, batch[:, :-1], seq_len if static_cache else None)
            else:
                logits = model(input_ids=batch[:, :-1]).logits
            logits = logits.float()  # [B, T, V]
            total_nats += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    return total_nats / math.log(2) / n_bytes


def decode_logits(model: torch.nn.Module, ids: torch.Tensor, static_len: int | None = None) -> torch.Tensor:
    """Logits [B, T, V] of feeding ids [B, T] one position at a time through a KV cache: a `DynamicCache`, or a
    `StaticCache` of `static_len` positions."""
    cache = DynamicCache() if static_len is None else StaticCache(config=model.config, max_cache_len=static_len)
    steps = []
    for t in range(ids.shape[1]):  # fresh [B, 1] inputs: a slice's strides would differ with T (a recompile)
        step_ids = ids[:, t : t + 1].clone(memory_format=torch.contiguous_format)
        pos = torch.full_like(step_ids, t)
        steps.append(model(input_ids=step_ids, cache=cache, use_cache=True, position_ids=pos).logits)
    return torch.cat(steps, dim=1)


def _same_length_groups(windows: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[int, list[torch.Tensor]] = {}
    for w in windows:
        groups.setdefault(w.numel(), []).append(w)
    return list(groups.values())
