"""Safetensors checkpoints read and written a byte range at a time, never as whole state dicts.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
{dtype, shape, data_offsets: [begin, end)} (offsets relative to the end of the header), then the data.
Knowing every output shape before any data is read lets a shard be written header first and then
tensor by tensor, copying byte ranges from the source with `os.copy_file_range` (kernel-side, no user
memory) and falling back to a small buffer where the file system refuses it.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from moeprune.errors import MoePruneError

__all__ = ["TensorInfo", "Checkpoint", "read_header", "read_tensor", "TORCH_DTYPES", "write_shard", "OutTensor", "DTYPE_SIZES", "INDEX_FILE",
           "SINGLE_FILE"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPE_SIZES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
_COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


# safetensors dtype codes -> torch dtype attribute names (those this torch may lack are skipped on use)
TORCH_DTYPES = {"F64": "float64", "I64": "int64", "U64": "uint64", "F32": "float32", "I32": "int32",
                "U32": "uint32", "F16": "float16", "BF16": "bfloat16", "I16": "int16", "U16": "uint16",
                "I8": "int8", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F8_E8M0": "float8_e8m0fnu"}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit


def _damaged(path: Path, why: str) -> MoePruneError:
    return MoePruneError(f"{path}: damaged safetensors file ({why}); re-download or re-save this shard")


def read_header(path: Path) -> tuple[dict, int]:
    """(header dict, absolute offset of the data section) of one safetensors file.

    Every entry is checked against the file: a known dtype, a shape whose byte count equals its data
    range, and a data range inside the file, so a truncated or garbled shard fails here, named.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise _damaged(path, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                raise _damaged(path, f"header length {n} exceeds the file's {size} bytes")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise MoePruneError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _damaged(path, f"unreadable header: {exc}") from None
    if not isinstance(header, dict):
        raise _damaged(path, "the header is not a JSON object")
    for name, h in header.items():
        if name != "__metadata__":
            _check_entry(path, name, h, size - 8 - n)
    return header, 8 + n


def _check_entry(path: Path, name: str, h, data_size: int) -> None:
    try:
        dtype, shape, (b, e) = h["dtype"], [int(d) for d in h["shape"]], [int(x) for x in h["data_offsets"]]
    except (TypeError, KeyError, ValueError):
        raise _damaged(path, f"tensor {name!r} has no valid dtype/shape/data_offsets") from None
    if dtype not in DTYPE_SIZES:
        raise _damaged(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not 0 <= b <= e or e - b != DTYPE_SIZES[dtype] * math.prod(shape):
        raise _damaged(path, f"tensor {name!r}: data_offsets {[b, e]} do not match {dtype} {shape}")
    if e > data_size:
        raise _damaged(path, f"truncated: tensor {name!r} ends at data byte {e}, the file holds {data_size}")


def read_tensor(info: TensorInfo, out=None):
    """The tensor `info` as a new CPU torch tensor, read with positioned reads (the file is never mapped,
    so nothing of it stays resident once the tensor is freed). With `out` (a contiguous CPU tensor of
    `info`'s dtype and element count, e.g. one expert's slot in a stacked tensor) the bytes go straight
    there and `out` is returned."""
    import torch

    dtype = getattr(torch, TORCH_DTYPES.get(info.dtype, ""), None)
    if dtype is None:
        raise MoePruneError(f"{info.file}: tensor {info.name!r} has dtype {info.dtype}, which this torch cannot hold")
    if out is not None:
        if out.dtype != dtype or out.numel() * out.element_size() != info.nbytes or not out.is_contiguous():
            raise ValueError(f"{info.name}: out must be a contiguous {dtype} tensor of {info.nbytes} bytes")
        target = out
    else:
        target = torch.empty(info.shape, dtype=dtype)
    view = memoryview(target.view(-1).view(torch.uint8).numpy()) if info.nbytes else memoryview(b"")
    try:
        fd = os.open(info.file, os.O_RDONLY)
    except OSError as exc:
        raise MoePruneError(f"{info.file}: cannot read ({exc.strerror or exc})") from None
    try:
        pos = 0
        while pos < info.nbytes:
            k = os.preadv(fd, [view[pos:]], info.begin + pos)
            if k <= 0:
                raise _damaged(info.file, f"truncated: tensor {info.name!r} ends at byte {info.end}, the file "
                                          f"has {os.fstat(fd).st_size}")
            pos += k
    finally:
        os.close(fd)
    return target


class Checkpoint:
    """The tensors of a model folder's safetensors files (sharded with an index, or one file), by name."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            files = _index_files(index)
        elif (self.folder / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        else:
            raise MoePruneError(f"{self.folder} has no safetensors weights (expected {INDEX_FILE} or {SINGLE_FILE})")
        self.files = [self.folder / name for name in files]
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for path in self.files:
            if not path.is_file():
                raise MoePruneError(f"{path} is listed in {INDEX_FILE} but does not exist")
            header, start = read_header(path)
            meta = header.pop("__metadata__", None) or {}
            self.metadata.update(meta if isinstance(meta, dict) else {})
            # file order, by data offset: reading follows the disk
            for name, h in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                b, e = h["data_offsets"]
                self.tensors[name] = TensorInfo(name, path, h["dtype"], tuple(h["shape"]), start + b, start + e)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def load(self, name: str, *, device: str = "cpu", out=None):
        """One tensor as a torch tensor (a copy; the file is not kept mapped); into `out` when given (CPU)."""
        t = read_tensor(self.tensors[name], out=out)
        return t if str(device) == "cpu" else t.to(device)


def _index_files(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise MoePruneError(f"{index}: not a readable safetensors index ({type(exc).__name__}: {exc}); "
                            "it needs a \"weight_map\" of tensor name -> shard file") from None
    if not all(isinstance(f, str) and f for f in files):
        raise MoePruneError(f"{index}: weight_map values must be shard file names")
    return files


@dataclass
class OutTensor:
    """One tensor of an output shard: its name, dtype, shape and where its bytes come from.

    Either `ranges` (absolute byte ranges of `source.file`, copied in order) or `make` (a callable
    returning the bytes, for slices that are not contiguous rows).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorInfo
    ranges: list[tuple[int, int]] | None = None
    make: object = None

    @property
    def nbytes(self) -> int:
        if self.ranges is not None:
            return sum(e - b for b, e in self.ranges)
        n = DTYPE_SIZES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n


def _write_all(dst, data) -> None:
    view = memoryview(data)
    while len(view):
        view = view[dst.write(view):]


def _copy_range(src_fd: int, dst, begin: int, end: int, buf: bytearray, src: Path) -> None:
    pos = begin
    while pos < end:
        try:
            n = os.copy_file_range(src_fd, dst.fileno(), end - pos, pos)
        except (OSError, AttributeError):
            n = 0
        if n <= 0:  # unsupported here (or a short read): plain buffered copy of the rest
            view = memoryview(buf)
            while pos < end:
                k = os.preadv(src_fd, [view[:min(len(buf), end - pos)]], pos)
                if k <= 0:
                    raise _damaged(src, f"truncated: ends at byte {pos} while copying tensor bytes up to {end}")
                _write_all(dst, view[:k])
                pos += k
            return
        pos += n


def write_shard(path: Path, tensors: list[OutTensor], *, metadata: dict[str, str] | None = None) -> int:
    """Write one safetensors file from `tensors`; returns the bytes of tensor data written.

    Tensors are laid out largest element size first so every tensor is aligned to its element size.
    """
    ordered = sorted(tensors, key=lambda t: -DTYPE_SIZES.get(t.dtype, 1))
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for t in ordered:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    buf = bytearray(_COPY_CHUNK)
    fds: dict[Path, int] = {}
    try:
        with open(path, "wb", buffering=0) as out:
            _write_all(out, struct.pack("<Q", len(raw)) + raw)
            for t in ordered:
                if t.ranges is None:
                    _write_all(out, t.make())
                    continue
                fd = fds.get(t.source.file)
                if fd is None:
                    fd = fds[t.source.file] = os.open(t.source.file, os.O_RDONLY)
                for b, e in t.ranges:
                    _copy_range(fd, out, b, e, buf, t.source.file)
    finally:
        for fd in fds.values():
            os.close(fd)
    return offset
