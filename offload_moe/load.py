"""`load(path, ...)`: open a checkpoint directory with only the budget of experts ever on the device.

Non-expert weights are read and moved to the device; expert weights stay in the safetensors files, memory-mapped,
and are copied one expert at a time when the cache needs them. Both checkpoint layouts are understood: fused
(`experts.gate_up_proj` [E, 2I, H]) and per-expert (Mixtral's `experts.{e}.w1/w3/w2`, Qwen/OLMoE's
`experts.{e}.gate_proj/up_proj/down_proj`), which is how transformers saves them and how the hub serves them.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from hooks import MoEBlock
from offload_moe import compat
from offload_moe.blocks import moe_blocks
from offload_moe.formats import MatrixFormat, matrix_format
from offload_moe.handle import OffloadHandle
from offload_moe.options import OffloadOptions
from offload_moe.packed_checkpoint import (
    FUSED,
    PART,
    PER_EXPERT,
    decode_dense,
    each_expert,
    packed_experts,
    unreadable,
)
from offload_moe.patch import offload, resolve_device
from offload_moe.progress import progress
from offload_moe.runtime.disk import FileSpan
from offload_moe.runtime.packed import PackedLayout
from offload_moe.runtime.process import storage_read_bytes
from offload_moe.runtime.ram_tier import RamTier
from offload_moe.runtime.store import HostStore, Piece, mmap_safetensors
from offload_moe.sizing import ram_tier_slots

READS = ("pread", "mmap")  # how load() reads an expert for a copy

# Checkpoint key renames that transformers applies when loading (only Mixtral's block name changed).
_RENAMES = [(re.compile(r"\.block_sparse_moe\."), ".mlp.")]


def load(
    path: str | Path,
    budget: float | str = "auto",
    device: str | torch.device | None = None,
    *,
    dtype: torch.dtype | None = None,
    read: str = "pread",
    ram_budget: float | str | None = None,
    options: OffloadOptions | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, OffloadHandle]:
    """Open the checkpoint directory `path` and patch it; returns `(model, handle)`.

    Expert weights are never all read into RAM: they are memory-mapped and copied to the device expert by expert.
    A checkpoint in a low-bit format (config.json's quantization_config: MXFP4, FP8 with block scales, int4/int8
    pack-quantized) keeps its experts in that format in the files, the RAM tier and the device pool, and the budget
    counts those bytes; a kernel pass decodes the experts it reads. Its other low-bit weights are decoded at load.
    budget, device, options / kwargs: as for `offload_moe.patch`.
    dtype: the compute dtype. Default None: the checkpoint's, which is what the model was trained and saved in.
    read: how a copy reads an expert: "pread" (default: large reads whose page cache is released behind them, so
        the budget is the memory really used) or "mmap" (copied out of the memory map; the page cache keeps what
        fits, and competes with everything else for RAM).
    ram_budget: experts to keep in RAM between the disk and a GPU (a fraction of the experts' bytes or a size such
        as "32GiB"; pinned on CUDA), so an expert the device evicted comes back from RAM, not from disk; needs
        read="pread". "auto": the RAM this process may still take (its cgroup's limit respected) less
        `memory_margin`; on a CPU device none, since there the device budget is RAM already and "auto" gives it all.
        Default None: no RAM tier, since how much RAM may be spent is the user's to say.
    """
    if read not in READS:
        raise ValueError(
            f"read={read!r} is not one of {READS}: 'pread' reads experts from the files and releases "
            "their page cache, 'mmap' copies them out of the memory map"
        )
    if ram_budget is not None and read != "pread":
        raise ValueError(
            "ram_budget keeps experts read from the files in RAM, and needs read='pread'; with "
            "read='mmap' the page cache is the RAM tier"
        )
    opt = OffloadOptions.of(options, **kwargs)
    if opt.pin_memory:
        raise ValueError(
            "load() keeps the experts memory-mapped on disk, and pinning them would read all of them into RAM; "
            "leave pin_memory unset, or use patch() on a model loaded with from_pretrained to pin"
        )
    path = Path(path)
    read_base = storage_read_bytes()  # handle.stats() counts the checkpoint's reads from here
    tensors, files, shards = _open_checkpoint(path, open_files=read == "pread")
    piece = _piece_maker(files)
    config = AutoConfig.from_pretrained(path)
    fmt = _format(path, tensors)
    config.__dict__.pop("quantization_config", None)  # the model is built plain; its experts are ours to decode
    if dtype is None:
        dtype = _saved_dtype(config, tensors)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    blocks = moe_blocks(model)

    dense = {}
    experts, layout, used = _experts(tensors, shards, blocks, fmt, dtype, piece)
    if fmt is not None:  # the other low-bit weights (DeepSeek's FP8 attention), decoded now
        decoded, decoded_keys = decode_dense({k: t for k, t in tensors.items() if k not in used}, shards, fmt, dtype)
        dense.update(decoded)
        used |= decoded_keys
    for name, t in progress(tensors.items(), f"offload_moe.load: {path.name}", unit="tensor"):
        if name in used:
            continue
        if ".experts." in name and any(name.startswith(f"{b.name}.experts.") for b in blocks):
            raise unreadable([k for k in tensors if ".experts." in k and k not in used], "")
        if read == "pread":  # into RAM now, past the memory map: a fault on it would read around it (8 MB here)
            t = _read(t, files[t.untyped_storage().data_ptr()].fileno())
        dense[name] = t.to(dtype) if t.is_floating_point() else t

    shapes = blocks[0].expert_shapes()
    ram = None
    if ram_budget is not None:
        ram = _ram_tier(
            HostStore(experts, shapes, packed=layout), ram_budget, resolve_device(device), opt.margin_bytes()
        )
    store = HostStore(experts, shapes, files=list(files.values()), ram=ram, packed=layout)
    _load_dense(model, dense, path)
    handle = offload(model, budget, device, opt, store=store, read_base=read_base)
    return model, handle


def _saved_dtype(config: Any, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype the model was saved in: its config's, else its float weights' (by bytes; a low-bit checkpoint's
    float32 scales are a small share)."""
    saved = getattr(config, "dtype", None)
    if isinstance(saved, torch.dtype):
        return saved
    nbytes: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point() and t.dtype.itemsize > 1:
            nbytes[t.dtype] = nbytes.get(t.dtype, 0) + t.nbytes
    return max(nbytes, key=nbytes.__getitem__)


@contextmanager
def expert_spans(path: Path, blocks: list[MoEBlock], dtype: torch.dtype) -> Iterator[list[list[list[FileSpan]]]]:
    """Where each expert's pieces lie in the checkpoint's files ([layer][expert] -> spans), as `load` reads them
    (`fit` times reading a few); the files stay open inside the `with`."""
    tensors, files, shards = _open_checkpoint(path, open_files=True)
    try:
        experts = _experts(tensors, shards, blocks, _format(path, tensors), dtype, _piece_maker(files))[0]
        yield [[[p.span for p in pieces] for pieces in layer] for layer in experts]
    finally:
        for f in files.values():
            f.close()


def _piece_maker(files: dict[int, io.FileIO]) -> Callable[[str, int, torch.Tensor], Piece]:
    """Pieces of memory-mapped tensors, each with its span in its file where the files are open (read="pread")."""

    def piece(name: str, row: int, t: torch.Tensor) -> Piece:
        span = FileSpan.of(files[t.untyped_storage().data_ptr()].fileno(), t) if files else None
        return Piece(name, row, t, span)

    return piece


def _format(path: Path, tensors: dict[str, torch.Tensor]) -> MatrixFormat | None:
    """The low-bit format config.json names for the experts (None: plain floats), or an error naming the experts."""
    try:
        return matrix_format(json.loads((path / "config.json").read_text()).get("quantization_config"))
    except ValueError as e:
        raise unreadable([k for k in tensors if ".experts." in k], str(e)) from None


def _experts(
    tensors: dict[str, torch.Tensor],
    shards: dict[str, Path],
    blocks: list[MoEBlock],
    fmt: MatrixFormat | None,
    dtype: torch.dtype,
    piece: Callable[[str, int, torch.Tensor], Piece],
) -> tuple[list[list[list[Piece]]], PackedLayout | None, set[str]]:
    """Every expert's pieces ([layer][expert]), their packed layout (None: plain floats) and the keys they use."""
    found = packed_experts(tensors, shards, blocks, fmt, dtype, lambda n, t: piece(n, 0, t)) if fmt else None
    if found is not None:
        return found
    experts, used = _plain_experts(tensors, blocks, piece)
    return experts, None, used


def _plain_experts(
    tensors: dict[str, torch.Tensor], blocks: list, piece: Callable[[str, int, torch.Tensor], Piece]
) -> tuple[list[list[list[Piece]]], set[str]]:
    """Every expert's pieces from a checkpoint of float experts, fused or per expert, and the keys they use."""
    block_index = {b.name: b for b in blocks}
    pieces: dict[tuple[int, int], list[Piece]] = {}
    used = set()
    for name, t in tensors.items():
        m = PER_EXPERT.match(name)
        if m and m["s"] == ".weight" and m["block"] in block_index:
            b = block_index[m["block"]]
            target, half = PART[m["w"]]
            pieces.setdefault((b.index, int(m["e"])), []).append(piece(target, half * t.shape[0], t))
            used.add(name)
            continue
        m = FUSED.match(name)
        if m and m["block"] in block_index and m["name"] in block_index[m["block"]].expert_param_names():
            b = block_index[m["block"]]
            for e in range(b.num_experts):
                pieces.setdefault((b.index, e), []).append(piece(m["name"], 0, t[e]))
            used.add(name)
    return each_expert(blocks, pieces, lambda got, _: sorted(got, key=lambda p: (p.name, p.row))), used


def _ram_tier(store: HostStore, ram_budget: float | str, device: torch.device, margin: int) -> RamTier | None:
    """A RAM tier of `ram_budget` (of every expert's bytes as the checkpoint stores them; `ram_tier_slots`), pinned
    for a CUDA device; None where "auto" leaves it no expert."""
    file_dtype = store.experts[0][0][0].src.dtype
    one = store.expert_bytes(file_dtype)
    slots = ram_tier_slots(ram_budget, one, one * store.num_layers * store.num_experts, device, margin)
    return RamTier(store.pool_parts(file_dtype), slots, pin=device.type == "cuda") if slots else None


def _read(t: torch.Tensor, fd: int) -> torch.Tensor:
    """A memory-mapped tensor's bytes read from its file into a fresh tensor (page cache released)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    FileSpan.of(fd, t).read_into(out.view(-1).view(torch.uint8))
    return out


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def shard_names(path: Path) -> list[str]:
    """The checkpoint directory's safetensors shards, each checked present; errors that say how to fix the
    directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a checkpoint directory")
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(
            f"{path} has no model.safetensors or model.safetensors.index.json; offload_moe.load reads safetensors "
            "checkpoints only (re-save others with save_pretrained(safe_serialization=True))"
        )
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise FileNotFoundError(
            f"{path} is missing {len(absent)} of the {len(shards)} shards its model.safetensors.index.json lists: "
            f"{', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}; finish the download (a hub client resumes "
            "it) or copy those files in, then load again"
        )
    return shards


def _open_checkpoint(
    path: Path, open_files: bool
) -> tuple[dict[str, torch.Tensor], dict[int, io.FileIO], dict[str, Path]]:
    """Every tensor of the checkpoint's safetensors shards, memory-mapped, by its name as transformers loads it;
    (open_files) each shard open for reading, by the data pointer of its memory map; and each tensor's shard."""
    shards = shard_names(path)
    tensors: dict[str, torch.Tensor] = {}
    files: dict[int, io.FileIO] = {}
    shard_of: dict[str, Path] = {}
    for shard in shards:
        mapped = mmap_safetensors(path / shard)
        if mapped and open_files:
            files[next(iter(mapped.values())).untyped_storage().data_ptr()] = io.FileIO(path / shard, "r")
        for key, t in mapped.items():
            tensors[_rename(key)] = t
            shard_of[_rename(key)] = path / shard
    return tensors, files, shard_of


def _load_dense(model: torch.nn.Module, dense: dict[str, torch.Tensor], path: Path) -> None:
    """Assign the non-expert weights to the meta-initialised model, tie embeddings, and build its buffers."""
    expert_keys = {f"{b.name}.experts.{n}" for b in moe_blocks(model) for n in b.expert_param_names()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    model.tie_weights()
    missing = [k for k in result.missing_keys if k not in expert_keys and model.get_parameter_or_buffer(k).is_meta]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path}: checkpoint does not match {type(model).__name__}: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    # Non-persistent buffers (rotary frequencies) are not in checkpoints: build them as from_pretrained does.
    for module in model.modules():
        meta_buffers = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
        if not meta_buffers:
            continue
        for n in meta_buffers:
            setattr(module, n, torch.empty_like(getattr(module, n), device="cpu"))
        compat.init_weights(model, module)
