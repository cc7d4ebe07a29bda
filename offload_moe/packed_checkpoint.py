"""A low-bit checkpoint's experts as packed pieces for `load` (MXFP4, FP8 with block scales, int4/int8 packed), each
tensor checked against the shape, dtype and scale values its format gives it; and the checkpoint's other low-bit
weights (DeepSeek's FP8 attention) decoded at load, since only experts are worth keeping packed."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from hooks import MoEBlock
from offload_moe import compat
from offload_moe.formats import FORMATS, MatrixFormat, Plain
from offload_moe.runtime.packed import PackedLayout, PackedPiece
from offload_moe.runtime.store import Piece

PER_EXPERT = re.compile(
    r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)(?P<s>\.\w+)$"
)
FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<name>[A-Za-z_]+)$")
PART = {  # a per-expert checkpoint's matrices: (the fused weight they are rows of, which half)
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", 0),
    "down_proj": ("down_proj", 0),
}
SHAPE = ".weight_shape"  # compressed-tensors stores each matrix's shape beside it; the model's shape is checked

Stored = dict[str, tuple[str, torch.Tensor]]  # suffix -> (checkpoint key, tensor) of one matrix of one expert
T = TypeVar("T")
MakePiece = Callable[[str, torch.Tensor], Piece]  # (pool part name, tensor) -> a store piece (with its file span)


class CheckpointError(ValueError):
    """A tensor of the checkpoint is not what its format says: names the file and the tensor."""


def packed_experts(
    tensors: dict[str, torch.Tensor],
    shards: dict[str, Path],
    blocks: list[MoEBlock],
    fmt: MatrixFormat,
    dtype: torch.dtype,
    make_piece: MakePiece,
) -> tuple[list[list[list[Piece]]], PackedLayout, set[str]] | None:
    """Every expert of `blocks` as packed pieces, their layout, and the checkpoint keys they use; None when the
    checkpoint holds no expert in `fmt` (its experts are plain). tensors: by (renamed) key; shards: key -> its file."""
    found, used = _find(tensors, blocks, fmt)
    if not found:
        return None
    for key in used:  # scales are small (1/16 of MXFP4's bytes, less in the others): checked in full
        if key.endswith(fmt.scales):
            _check_scales(fmt, key, tensors[key], shards)
    layout = _layout(found[(blocks[0].index, 0)], blocks[0], fmt, dtype, shards)
    experts = each_expert(blocks, found, lambda stored, what: _pieces(stored, layout, shards, make_piece, what))
    return experts, layout, used


def each_expert(
    blocks: list[MoEBlock], found: dict[tuple[int, int], T], pieces: Callable[[T, str], list[Piece]]
) -> list[list[list[Piece]]]:
    """[layer][expert] -> `pieces(stored, what)` of what the checkpoint holds for each expert (`found`, by (layer,
    expert)); an expert it lacks is refused by name."""
    experts = []
    for b in blocks:
        layer = []
        for e in range(b.num_experts):
            stored = found.get((b.index, e))
            if stored is None:
                raise CheckpointError(f"no weights found for expert {e} of {b.name}; is this the right checkpoint?")
            layer.append(pieces(stored, f"expert {e} of {b.name}"))
        experts.append(layer)
    return experts


def decode_dense(
    tensors: dict[str, torch.Tensor], shards: dict[str, Path], fmt: MatrixFormat, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The checkpoint's low-bit weights outside the experts, decoded to `dtype` under their plain names, and the
    keys they used."""
    out, used = {}, set()
    for key, scales in tensors.items():
        if not key.endswith(fmt.scales) or key in used:
            continue
        base = key[: -len(fmt.scales)]
        if base + fmt.values not in tensors:
            continue
        values = tensors[base + fmt.values]
        f = fmt.with_scales(scales.dtype)
        rows, cols = f.matrix_shape(values, scales)
        stored = {fmt.values: (base + fmt.values, values), fmt.scales: (key, scales)}
        _check(stored, f, rows, cols, shards)
        _check_scales(f, key, scales, shards)
        parts = {s: t.unsqueeze(0) for s, (_, t) in stored.items()}
        out[base + fmt.weight] = f.decode(parts, rows, cols, dtype)[0]
        used.update((key, base + fmt.values, base + SHAPE))
    return out, used & tensors.keys()


def unreadable(keys: list[str], why: str) -> ValueError:
    """The error for a checkpoint whose experts no known format (nor the plain layout) accounts for: names the
    tensors found (`keys`), the formats read, and what to do. why: what was wrong, where known."""
    kinds = sorted({re.sub(r"\.\d+(?=\.)", ".*", k) for k in keys})  # one name per kind of tensor
    return ValueError(
        (f"{why}. " if why else "")
        + f"The checkpoint's experts are stored as {', '.join(kinds[:8]) or 'no tensor'}"
        + (f" and {len(kinds) - 8} more kinds" if len(kinds) > 8 else "")
        + f"; offload_moe reads plain float experts and {', '.join(FORMATS)}, named by config.json's "
        "quantization_config. Dequantize the checkpoint to bf16 (from_pretrained, then save_pretrained) to load it"
    )


def _find(
    tensors: dict[str, torch.Tensor], blocks: list[MoEBlock], fmt: MatrixFormat
) -> tuple[dict[tuple[int, int], dict[tuple[str, int], Stored]], set[str]]:
    """(layer, expert) -> (weight, half) -> its stored tensors; and every key used."""
    index = {b.name: b for b in blocks}
    suffixes = {fmt.values, fmt.scales}
    found: dict[tuple[int, int], dict[tuple[str, int], Stored]] = {}
    used: set[str] = set()
    packed = False
    for key, t in tensors.items():
        m = PER_EXPERT.match(key)
        if m and m["block"] in index and m["s"] in suffixes | {SHAPE}:
            used.add(key)
            if m["s"] != SHAPE:
                weight, half = PART[m["w"]]
                at = (index[m["block"]].index, int(m["e"]))
                found.setdefault(at, {}).setdefault((weight, half), {})[m["s"]] = (key, t)
                packed = True
            continue
        m = FUSED.match(key)
        if not (m and m["block"] in index):
            continue
        b = index[m["block"]]
        names = sorted(b.expert_param_names(), key=len, reverse=True)  # gate_up_proj_bias before gate_up_proj
        hit = next(((w, m["name"][len(w) :]) for w in names if m["name"].startswith(w)), None)
        if hit is None or hit[1] not in suffixes | {""}:
            continue
        weight, suffix = hit
        used.add(key)
        packed = packed or suffix != ""
        for e in range(b.num_experts):
            found.setdefault((b.index, e), {}).setdefault((weight, 0), {})[suffix] = (f"{key}[{e}]", t[e])
    return (found, used) if packed else ({}, set())


def _layout(
    first: dict[tuple[str, int], Stored], block: MoEBlock, fmt: MatrixFormat, dtype: torch.dtype, shards: dict
) -> PackedLayout:
    """The layout every expert must share, from the model's weight shapes and the first expert's tensors."""
    layout = compat.expert_layout(block.experts)
    transposed = layout is not None and layout.is_transposed
    dense = block.expert_shapes()
    halves = {w: sum(1 for w2, _ in first if w2 == w) for w, _ in first}
    if set(halves) != set(dense):
        raise CheckpointError(
            f"{block.name}: the checkpoint's experts hold {sorted(halves)}, the model's {sorted(dense)}; is this the "
            "right checkpoint for this config?"
        )
    pieces = []
    for (weight, half), stored in sorted(first.items()):
        shape = dense[weight]
        if len(shape) == 1:
            rows, cols = shape[0] // halves[weight], 0
        else:
            out, inp = (shape[1], shape[0]) if transposed else shape
            rows, cols = out // halves[weight], inp
        if set(stored) == {""}:
            f: MatrixFormat = Plain("", stored[""][1].dtype)
        elif set(stored) == {fmt.values, fmt.scales}:
            f = fmt.with_scales(stored[fmt.scales][1].dtype)
        else:
            key = next(iter(stored.values()))[0]
            raise CheckpointError(
                f"{shards[_file_key(key)]}: {key} is stored as {sorted(stored)}; {fmt.name} stores "
                f"{sorted({fmt.values, fmt.scales})}: a tensor is missing, or the checkpoint is not in the format "
                "its config.json names"
            )
        pieces.append(PackedPiece(weight, half * rows, rows, cols, f))
    return PackedLayout(pieces, dense, dtype, transposed)


def _pieces(
    stored: dict[tuple[str, int], Stored], layout: PackedLayout, shards: dict, make_piece: MakePiece, what: str
) -> list[Piece]:
    """One expert's store pieces, each tensor checked against the layout."""
    if len(stored) != len(layout.pieces):
        raise CheckpointError(f"{what} has {sorted(stored)}, the first expert {[p[:2] for p in layout.pieces]}")
    out = []
    for p in layout.pieces:
        got = stored.get((p.weight, p.row // p.rows if p.rows else 0))
        if got is None:
            raise CheckpointError(f"{what} has no {p.weight} rows {p.row}:{p.row + p.rows} in the checkpoint")
        _check(got, p.fmt, p.rows, p.cols, shards)
        names = p.part_names()
        out.extend(make_piece(names[s], t) for s, (_, t) in got.items())
    return sorted(out, key=lambda piece: piece.name)


def _check(stored: Stored, fmt: MatrixFormat, rows: int, cols: int, shards: dict) -> None:
    """Each tensor has the shape and dtype `fmt` stores a [rows, cols] matrix in; else names the file and tensor."""
    want = fmt.parts(rows, cols)
    for suffix, (key, t) in stored.items():
        shape, dt = want[suffix]
        if tuple(t.shape) != shape or t.dtype != dt:
            raise CheckpointError(
                f"{shards[_file_key(key)]}: tensor {key} is {t.dtype} {list(t.shape)}, but {fmt.name} stores this "
                f"[{rows}, {cols}] matrix's {suffix or 'values'} as {dt} {list(shape)}: the checkpoint is damaged or "
                "does not match its config.json; re-download it"
            )


def _check_scales(fmt: MatrixFormat, key: str, scales: torch.Tensor, shards: dict) -> None:
    """The scale tensor `key` holds values its format allows; else names the file and tensor."""
    why = fmt.bad_values(fmt.scales, scales)
    if why is not None:
        raise CheckpointError(f"{shards[key]}: tensor {key} {why}; the checkpoint is damaged: re-download it")


def _file_key(key: str) -> str:
    """The checkpoint key of a fused tensor's expert slice `key[e]`."""
    return key.split("[", 1)[0]
