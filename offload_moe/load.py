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
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from offload_moe import compat
from offload_moe.blocks import moe_blocks
from offload_moe.budget import budget_bytes
from offload_moe.handle import OffloadHandle
from offload_moe.options import OffloadOptions
from offload_moe.patch import offload, resolve_device
from offload_moe.runtime.disk import FileSpan
from offload_moe.runtime.process import storage_read_bytes
from offload_moe.runtime.ram_tier import RamTier
from offload_moe.runtime.store import HostStore, Piece, expert_nbytes, mmap_safetensors

READS = ("pread", "mmap")  # how load() reads an expert for a copy

# Checkpoint key renames that transformers applies when loading (only Mixtral's block name changed).
_RENAMES = [(re.compile(r"\.block_sparse_moe\."), ".mlp.")]
_PER_EXPERT = re.compile(r"^(?P<block>.+)\.experts\.(?P<e>\d+)\.(?P<w>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_FUSED = re.compile(r"^(?P<block>.+)\.experts\.(?P<name>[A-Za-z_]+)$")
_PART = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", 0),
    "down_proj": ("down_proj", 0),
}


def load(
    path: str | Path,
    budget: float | str = 1.0,
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
    budget, device, options / kwargs: as for `offload_moe.patch`.
    dtype: the compute dtype. Default None: the checkpoint's, which is what the model was trained and saved in.
    read: how a copy reads an expert: "pread" (default: large reads whose page cache is released behind them, so
        the budget is the memory really used) or "mmap" (copied out of the memory map; the page cache keeps what
        fits, and competes with everything else for RAM).
    ram_budget: experts to keep in RAM between the disk and a GPU (a fraction of the experts' bytes or a size such
        as "32GiB"; pinned on CUDA), so an expert the device evicted comes back from RAM, not from disk; needs
        read="pread". Default None: no RAM tier, since how much RAM may be spent is the user's to say.
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
    tensors, files = _open_checkpoint(path, open_files=read == "pread")

    def piece(name: str, row: int, t: torch.Tensor) -> Piece:
        span = FileSpan.of(files[t.untyped_storage().data_ptr()].fileno(), t) if read == "pread" else None
        return Piece(name, row, t, span)

    config = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = next(t.dtype for t in tensors.values() if t.is_floating_point())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    blocks = moe_blocks(model)
    block_index = {b.name: b for b in blocks}

    dense: dict[str, torch.Tensor] = {}
    pieces: dict[tuple[int, int], list[Piece]] = {}
    for key, t in tensors.items():
        name = _rename(key)
        m = _PER_EXPERT.match(name)
        if m and m["block"] in block_index:
            b = block_index[m["block"]]
            target, half = _PART[m["w"]]
            pieces.setdefault((b.index, int(m["e"])), []).append(piece(target, half * t.shape[0], t))
            continue
        m = _FUSED.match(name)
        if m and m["block"] in block_index and m["name"] in block_index[m["block"]].expert_param_names():
            b = block_index[m["block"]]
            for e in range(b.num_experts):
                pieces.setdefault((b.index, e), []).append(piece(m["name"], 0, t[e]))
            continue
        if read == "pread":  # into RAM now, past the memory map: a fault on it would read around it (8 MB here)
            t = _read(t, files[t.untyped_storage().data_ptr()].fileno())
        dense[name] = t.to(dtype) if t.is_floating_point() else t

    shapes = {n: tuple(getattr(blocks[0].experts, n).shape[1:]) for n in blocks[0].expert_param_names()}
    experts = []
    for b in blocks:
        layer = []
        for e in range(b.num_experts):
            got = pieces.get((b.index, e))
            if not got:
                raise ValueError(f"{path}: no weights found for expert {e} of {b.name}; is this the right checkpoint?")
            layer.append(sorted(got, key=lambda p: (p.name, p.row)))
        experts.append(layer)
    ram = _ram_tier(experts, shapes, ram_budget, resolve_device(device)) if ram_budget is not None else None
    store = HostStore(experts, shapes, files=list(files.values()), ram=ram)
    _load_dense(model, dense, path)
    handle = offload(model, budget, device, opt, store=store, read_base=read_base)
    return model, handle


def _ram_tier(experts: list, shapes: dict, ram_budget: float | str, device: torch.device) -> RamTier:
    """A RAM tier of `ram_budget` (of every expert's bytes in the checkpoint's dtype), pinned for a CUDA device."""
    file_dtype = experts[0][0][0].src.dtype
    one = expert_nbytes(shapes, file_dtype)
    slots = budget_bytes(ram_budget, one * len(experts) * len(experts[0])) // one
    if slots < 1:
        raise ValueError(
            f"ram_budget={ram_budget!r} holds no expert (one is {one / 2**20:.1f} MiB); give at least "
            "that, or leave ram_budget unset"
        )
    return RamTier(shapes, file_dtype, slots, pin=device.type == "cuda")


def _read(t: torch.Tensor, fd: int) -> torch.Tensor:
    """A memory-mapped tensor's bytes read from its file into a fresh tensor (page cache released)."""
    out = torch.empty(t.shape, dtype=t.dtype)
    FileSpan.of(fd, t).read_into(out.view(-1).view(torch.uint8))
    return out


def _rename(key: str) -> str:
    for pattern, repl in _RENAMES:
        key = pattern.sub(repl, key)
    return key


def _open_checkpoint(path: Path, open_files: bool) -> tuple[dict[str, torch.Tensor], dict[int, io.FileIO]]:
    """Every tensor of the checkpoint's safetensors shards, memory-mapped, and (open_files) each shard open for
    reading, by the data pointer of its memory map."""
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
    tensors: dict[str, torch.Tensor] = {}
    files: dict[int, io.FileIO] = {}
    for shard in shards:
        mapped = mmap_safetensors(path / shard)
        if mapped and open_files:
            files[next(iter(mapped.values())).untyped_storage().data_ptr()] = io.FileIO(path / shard, "r")
        tensors.update(mapped)
    return tensors, files


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
