"""Item arrays that grow and change a row at a time, shared by the catalogue, the ranker tables and the filters.

Each array lives in one reserved span of address space with room to grow (``MAP_NORESERVE``: untouched room costs
no memory). Where the bundle's array lies mapped from ``arrays.npz`` (``recsys.bundle.map_arrays``), that file
region is mapped again, copy-on-write, at the start of the span: the workers of one host share its pages until a
row on one of them is replaced, and nothing is read until used. Rows added online fill the room after it.
Appending or replacing an item therefore writes that item's rows and nothing else; a full span is re-reserved at
twice the size (the one copy, amortised over as many additions as the catalogue had items).

Nothing here locks: every write happens under ``LiveCatalog``'s write lock, while no request reads.
"""
from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
from loguru import logger

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python's mmap module does not name it
MAP_FIXED = 0x10  # Linux's (and the BSDs') value
ROOM = 1 << 16  # rows of room a span has beyond twice the bundle's items, at least


class Column:
    """One item array with room to grow: ``rows`` is the whole span, rows past the catalogue's count unused."""

    def __init__(self, initial: np.ndarray, capacity: int, fill=None):
        """``initial``: the bundle's array (mapped, or in memory); ``fill``: what an added row holds until written
        (NaN / 0 by default)."""
        self.fill = fill if fill is not None else (np.nan if np.issubdtype(initial.dtype, np.floating) else 0)
        self.rows, self.mapped = _span_over(initial, capacity)  # (the array keeps its span alive)

    @property
    def capacity(self) -> int:
        return len(self.rows)

    def grow(self, n_used: int, capacity: int) -> None:
        """A span of ``capacity`` rows holding the first ``n_used`` (a copy: they become this process's own)."""
        rows, _ = _reserve(self.rows.dtype, self.rows.shape[1:], capacity)
        rows[:n_used] = self.rows[:n_used]
        self.rows, self.mapped = rows, False

    def append(self, start: int, count: int) -> None:
        """Rows ``start:start+count`` set to the fill (the room of an anonymous span is zeros, not the fill)."""
        self.rows[start : start + count] = self.fill


def _span_over(initial: np.ndarray, capacity: int) -> tuple[np.ndarray, bool]:
    """``initial`` at the start of a span of ``capacity`` rows, and whether its file pages are mapped there (a mapped
    bundle array) rather than copied."""
    source = _mapped_source(initial)
    if source is not None:
        rows = _map_file_rows(initial, capacity, *source)
        if rows is not None:
            return rows, True
    rows, _ = _reserve(initial.dtype, initial.shape[1:], capacity)
    rows[: len(initial)] = initial
    return rows, False


def _mapped_source(array: np.ndarray) -> tuple[str, int] | None:
    """``(file, offset)`` of an array ``map_arrays`` mapped whole from a file, else None."""
    base = array.base
    if isinstance(base, np.memmap) and base.filename and base.shape == array.shape and array.flags.c_contiguous \
            and base.ctypes.data == array.ctypes.data:
        return str(base.filename), int(base.offset)
    return None


def _reserve(dtype: np.dtype, row_shape: tuple, capacity: int, lead: int = 0) -> tuple[np.ndarray, mmap.mmap]:
    """Rows viewing an anonymous span for ``capacity`` rows after ``lead`` bytes, reserved but not committed, and the
    span (the rows hold it: it is unmapped with the last view of it)."""
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dtype.itemsize
    size = max(-(-(lead + capacity * row_bytes) // mmap.PAGESIZE), 1) * mmap.PAGESIZE
    span = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    return np.frombuffer(span, np.uint8, capacity * row_bytes, lead).view(dtype).reshape(capacity, *row_shape), span


def _map_file_rows(initial: np.ndarray, capacity: int, path: str, offset: int) -> np.ndarray | None:
    """A span whose first ``len(initial)`` rows are ``path``'s bytes at ``offset``, mapped private (copy-on-write)
    over the span's start with ``mmap(MAP_FIXED)``; None where that cannot be done here (then the caller copies)."""
    lead = offset % mmap.PAGESIZE
    rows, span = _reserve(initial.dtype, initial.shape[1:], capacity, lead)
    length = -(-(lead + initial.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE  # ends inside the file: no page past its end
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64)
        start = ctypes.addressof(ctypes.c_char.from_buffer(span))
        fd = os.open(path, os.O_RDONLY)
        try:
            got = libc.mmap(start, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | MAP_FIXED, fd, offset - lead)
        finally:
            os.close(fd)  # the mapping keeps the file open
    except (OSError, AttributeError) as err:
        logger.debug("item array copied, not mapped: {}", err)
        return None
    if got != start:  # refused: the span is still the anonymous one
        logger.debug("item array copied, not mapped: mmap errno {}", ctypes.get_errno())
        return None
    return rows
