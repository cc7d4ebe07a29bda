"""Expert bytes read straight from checkpoint files: `pread` into the destination, then the file's page cache for
those bytes released (`posix_fadvise(DONTNEED)`), so the memory a budget names is the memory really used.

Why not the memory map the checkpoint is opened with: a copy out of it leaves the bytes in the page cache, which
competes with the slot pool for the same RAM, and reads them slower than pread (and O_DIRECT) do; `python -m
lab.disk_read` times the read paths on a machine. The kernel's readahead stays on: without it (`POSIX_FADV_RANDOM`)
pread reads slower whatever the read size or the number of threads; the price is up to one readahead window
(`read_ahead_kb`) read past each expert and left cached.
"""

from __future__ import annotations

import os

import torch


class FileSpan:
    """A contiguous tensor stored at byte `offset` of the open file `fd`: one piece of one expert.

    Sliced by rows like the tensor it stands for (`span[r0:r1]`), so a copy can move it in chunks. `into`, where set,
    is a RAM tensor of the same shape and dtype the bytes land in on their way (the RAM tier's slot).
    """

    __slots__ = ("fd", "offset", "dtype", "shape", "into")

    def __init__(
        self, fd: int, offset: int, dtype: torch.dtype, shape: tuple[int, ...], into: torch.Tensor | None = None
    ):
        self.fd, self.offset, self.dtype, self.shape, self.into = fd, offset, dtype, tuple(shape), into

    def landing_in(self, into: torch.Tensor) -> FileSpan:
        """This span, its bytes kept in `into` (a contiguous CPU tensor of its shape and dtype) on their way."""
        if tuple(into.shape) != self.shape or into.dtype != self.dtype or into.device.type != "cpu":
            raise ValueError(
                f"a span of {self.dtype} {self.shape} cannot land in {into.dtype} {tuple(into.shape)} on {into.device}"
            )
        return FileSpan(self.fd, self.offset, self.dtype, self.shape, into)

    @classmethod
    def of(cls, fd: int, t: torch.Tensor) -> FileSpan:
        """The span of `t`, a contiguous view of a memory map of the file open as `fd`."""
        if not t.is_contiguous():
            raise ValueError("a file span needs a contiguous tensor")
        return cls(fd, t.storage_offset() * t.element_size(), t.dtype, tuple(t.shape))

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * torch.empty((), dtype=self.dtype).element_size()

    def __getitem__(self, rows: slice) -> FileSpan:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise ValueError("a file span is sliced by contiguous rows only")
        row_bytes = self.nbytes // self.shape[0]
        into = None if self.into is None else self.into[start:stop]
        return FileSpan(self.fd, self.offset + start * row_bytes, self.dtype, (stop - start, *self.shape[1:]), into)

    def read_into(self, buf: torch.Tensor) -> None:
        """Read the span's bytes into `buf` (a contiguous CPU uint8 tensor of `nbytes`), then release their page
        cache. A short read means the file is shorter than its header says."""
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.offset + done)
            if n == 0:
                raise OSError(
                    f"file descriptor {self.fd} ended {self.nbytes - done} bytes early at byte "
                    f"{self.offset + done}: the checkpoint shard is truncated"
                )
            done += n
        os.posix_fadvise(self.fd, self.offset, self.nbytes, os.POSIX_FADV_DONTNEED)


def read_span(span: FileSpan, dst: torch.Tensor, staging: torch.Tensor) -> None:
    """Copy `span` into `dst`: through its `into` tensor where it has one, directly when `dst` is a contiguous CPU
    tensor of the span's dtype, else through `staging` (a CPU uint8 buffer of at least `span.nbytes`, pinned for a
    CUDA `dst`)."""
    if tuple(dst.shape) != span.shape:
        raise ValueError(f"file span of shape {span.shape} cannot fill a tensor of shape {tuple(dst.shape)}")
    if span.into is not None:
        span.read_into(span.into.view(-1).view(torch.uint8))
        dst.copy_(span.into, non_blocking=dst.is_cuda)  # the RAM tier is pinned on CUDA
        return
    if dst.is_cpu and dst.dtype == span.dtype and dst.is_contiguous():
        span.read_into(dst.view(-1).view(torch.uint8))
        return
    staged = staging[: span.nbytes]
    span.read_into(staged)
    dst.copy_(staged.view(span.dtype).view(span.shape), non_blocking=dst.is_cuda)  # staging is pinned on CUDA
