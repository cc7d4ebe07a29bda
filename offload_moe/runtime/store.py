"""Host-side home of every expert: CPU tensors [E, ...] per layer and weight, in (pinned) RAM or memory-mapped.

The residency cache copies single experts from here into device slots. Memory-mapped tensors come straight from
safetensors files (`mmap_safetensors`), so opening a checkpoint reads no expert bytes until an expert is used.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from offload_moe.runtime.disk import FileSpan

if TYPE_CHECKING:
    from offload_moe.runtime.packed import PackedLayout
    from offload_moe.runtime.ram_tier import RamTier
    from offload_moe.runtime.transfer import Transfer, TransferEngine

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}


class Piece(NamedTuple):
    """Part of one expert on the host: `src` goes to rows `row:row + len(src)` of pool weight `name`. `span`, where
    set, is where `src` lies in its checkpoint file: copies to the device read it from there (`load(read="pread")`)."""

    name: str
    row: int
    src: torch.Tensor
    span: FileSpan | None = None


class HostStore:
    """Every expert of every MoE layer on the host, as the pieces that make up its fused device layout.

    `experts[layer][e]` lists the pieces of expert e; a fused checkpoint has one piece per weight (a view of
    `gate_up_proj[e]`), a per-expert checkpoint (Mixtral's w1/w3/w2) has gate and up as two pieces of `gate_up_proj`.
    `files`: the open checkpoint files that the pieces' spans read from. `packed`: the experts are kept in their
    checkpoint's low-bit format (`load` of such a checkpoint); the pieces are then its packed parts, and
    `expert_shapes` the weights they decode into.
    """

    def __init__(
        self,
        experts: list[list[list[Piece]]],
        expert_shapes: dict[str, tuple[int, ...]],
        files: list[io.FileIO] | None = None,
        ram: RamTier | None = None,
        packed: PackedLayout | None = None,
    ):
        if not experts or not experts[0]:
            raise ValueError("HostStore needs at least one layer with one expert")
        self.experts = experts
        self._files = files or []  # kept open for the pieces' file spans (closed with the store)
        self.ram = ram  # between the files and the device: experts kept in RAM (`load(..., ram_budget=)`)
        self.packed = packed
        self.expert_shapes = expert_shapes
        self.names = list(expert_shapes)
        self.num_layers = len(experts)
        self.num_experts = len(experts[0])
        self.layout = _layout(experts[0][0])  # [(part name, first row, end row)]: where each piece goes in a slot
        for layer, xs in enumerate(experts):
            if len(xs) != self.num_experts:
                raise ValueError(f"MoE layer {layer} has {len(xs)} experts, layer 0 has {self.num_experts}")
            bad = next((e for e, x in enumerate(xs) if _layout(x) != self.layout), None)
            if bad is not None:
                raise ValueError(
                    f"expert {bad} of MoE layer {layer} is stored as pieces {_layout(xs[bad])}, expert 0 of layer 0 as "
                    f"{self.layout}: every expert must have the same layout"
                )

    @classmethod
    def from_fused(cls, weights: list[dict[str, torch.Tensor]]) -> HostStore:
        """From per-layer fused tensors `weights[layer][name]` of shape [E, ...] (views, no copy)."""
        shapes = {n: tuple(t.shape[1:]) for n, t in weights[0].items()}
        for layer, w in enumerate(weights):
            got = {n: tuple(t.shape[1:]) for n, t in w.items()}
            if got != shapes:
                raise ValueError(
                    f"MoE layer {layer} has expert shapes {got}, layer 0 has {shapes}: offload-moe shares one slot "
                    "pool across layers and needs every layer's experts to have the same shapes"
                )
        n_experts = next(iter(weights[0].values())).shape[0]
        experts = [[[Piece(n, 0, t[e]) for n, t in w.items()] for e in range(n_experts)] for w in weights]
        return cls(experts, shapes)

    def expert(self, layer: int, expert: int) -> list[Piece]:
        return self.experts[layer][expert]

    def reads_files(self) -> bool:
        """True when copies read the checkpoint files (pread) rather than host tensors."""
        return bool(self._files)

    def copy_sources(self, layer: int, expert: int) -> list[torch.Tensor | FileSpan]:
        """What a copy of one expert to the device reads, piece by piece: its RAM tier slot where it holds the expert,
        else the file span where a piece has one (read with pread, its page cache released), else the host tensor.
        `copy_to` copies them."""
        pieces = self.experts[layer][expert]
        if self.ram is not None:
            return self.ram.sources((layer, expert), pieces)
        return [p.src if p.span is None else p.span for p in pieces]

    def copy_to(
        self,
        keys: list[tuple[int, int]],
        dst: list[list[torch.Tensor]],
        engine: TransferEngine,
        after: list[torch.cuda.Event],
        priority: int,
        wake: bool,
    ) -> list[tuple[Transfer, int]]:
        """Queue copies of experts `keys` [(layer, expert)] into `dst` (each expert's pieces, as `layout`) on `engine`:
        one copy of every key (`TransferEngine.submit_parts`), or one per key through a RAM tier (a tier slot claimed
        for one key may be the one an earlier key's copy reads: the claim waits for that copy). Returns each key's
        transfer and part."""
        if self.ram is None:
            transfer = engine.submit_parts(
                [(self.copy_sources(*k), d) for k, d in zip(keys, dst, strict=True)], after, priority, wake
            )
            return [(transfer, i) for i in range(len(keys))]
        out = []
        for key, d in zip(keys, dst, strict=True):
            transfer = engine.submit_parts([(self.copy_sources(*key), d)], after, priority, wake)
            self.ram.used_by(key, transfer)
            out.append((transfer, 0))
        return out

    def pool_parts(self, dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """What a device slot or RAM tier slot holds of one expert: part name -> (shape, dtype); `dtype` for
        weights the store does not keep packed."""
        if self.packed is not None:
            return self.packed.parts
        return {n: (s, dtype) for n, s in self.expert_shapes.items()}

    def compute_pieces(self, layer: int, expert: int) -> dict[str, list[tuple[int, torch.Tensor]]]:
        """One expert's weights as a kernel reads them: each weight's pieces [(first row, tensor)] in row order
        (a packed expert decoded whole)."""
        if self.packed is not None:
            return {n: [(0, t)] for n, t in self.expert_tensors(layer, expert).items()}
        out: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for p in self.experts[layer][expert]:
            out.setdefault(p.name, []).append((p.row, p.src))
        return {n: sorted(v, key=lambda rv: rv[0]) for n, v in out.items()}

    def expert_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's weights as whole tensors on the host: views of a fused store (no copy), assembled from a
        per-expert checkpoint's pieces (gate and up are two pieces of gate_up_proj), or decoded from packed parts."""
        if self.packed is not None:
            parts = {p.name: p.src.unsqueeze(0) for p in self.experts[layer][expert]}
            return {n: t[0] for n, t in self.packed.decode(parts).items()}
        out: dict[str, torch.Tensor] = {}
        for p in self.experts[layer][expert]:
            shape = self.expert_shapes[p.name]
            if p.row == 0 and tuple(p.src.shape) == shape:
                out[p.name] = p.src
                continue
            if p.name not in out:
                out[p.name] = torch.empty(shape, dtype=p.src.dtype)
            out[p.name][p.row : p.row + p.src.shape[0]].copy_(p.src)
        return out

    @property
    def expert_dtype(self) -> torch.dtype:
        """The dtype the host's experts compute in (a packed store's decoded dtype)."""
        return self.packed.dtype if self.packed is not None else self.experts[0][0][0].src.dtype

    def expert_bytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes of one expert once stored in `dtype` (default: as the host stores it); a packed store's experts
        are stored packed whatever the compute dtype."""
        if self.packed is not None:
            return self.packed.expert_bytes
        return expert_nbytes(self.expert_shapes, self.experts[0][0][0].src.dtype if dtype is None else dtype)

    def materialize(self, layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A layer's experts as fresh fused CPU tensors [E, ...] (reads every byte of the layer)."""
        if self.packed is not None:
            names = [p.name for p in self.experts[layer][0]]
            stacked = {n: torch.stack([x[i].src for x in self.experts[layer]]) for i, n in enumerate(names)}
            return {n: t.to(dtype) for n, t in self.packed.decode(stacked).items()}
        out = {n: torch.empty((self.num_experts, *s), dtype=dtype) for n, s in self.expert_shapes.items()}
        for e, pieces in enumerate(self.experts[layer]):
            for p in pieces:
                out[p.name][e, p.row : p.row + p.src.shape[0]].copy_(p.src)
        return out


def _layout(pieces: list[Piece]) -> list[tuple[str, int, int]]:
    return [(p.name, p.row, p.row + p.src.shape[0]) for p in pieces]


def expert_nbytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    """Bytes of one expert of these weight shapes in `dtype`."""
    return sum(torch.Size(s).numel() for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()


def mmap_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a zero-copy view of a private memory map of the file.

    Nothing is read from disk until a tensor's bytes are touched, so a 90 GB checkpoint opens in a moment and only
    the experts actually copied to the device ever enter RAM (as evictable page cache).
    """
    path = Path(path)
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError(f"its header claims {header_len} bytes, the file has {size}")
            header = json.loads(f.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("its header is not a JSON object")
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from e
    data_start = 8 + header_len
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which offload-moe cannot map")
        begin, end = info["data_offsets"]
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = data_start + begin
        shape = torch.Size(info["shape"])
        if offset % itemsize or end - begin != shape.numel() * itemsize:
            raise ValueError(f"{path}: tensor {name} is misaligned or truncated; re-save the checkpoint")
        if data_start + end > size:
            raise ValueError(
                f"{path}: tensor {name} ends at byte {data_start + end}, but the file has {size} bytes: "
                "the shard is truncated; re-download or re-save it"
            )
        t = torch.empty(0, dtype=dtype)
        t.set_(storage, offset // itemsize, shape, _contiguous_strides(shape))
        out[name] = t
    return out


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, acc = [], 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= dim
    return tuple(reversed(strides))
