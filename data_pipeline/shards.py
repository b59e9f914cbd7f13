"""The shard format: uncompressed WebDataset tars of fixed-size token rows.

Each shard ``{split}-{shard:06d}.tar`` holds only members named
``{split}-{shard:06d}-{row:08d}.tokens.npy``: one packed row of ``seq_len + 1`` tokens as a 1-D
``.npy`` array (uint16 when the vocabulary fits, else uint32). ``webdataset.WebDataset(url)
.decode()`` yields ``{"__key__": ..., "tokens.npy": ndarray}``; ``tar tvf`` lists it.

Every member has the same size, so every record (512-byte ustar header + member padded to 512)
has the same size R and row ``j`` of a shard starts at byte ``j * R``: a reader can fetch exactly
the rows it needs with a seek or an HTTP range request. The header's ``mtime`` field holds the
CRC-32 of the member's bytes, so a reader that sees only some rows can still check them (tar
tools show it as a date; nothing else reads it). The archive ends with the two zero blocks and
is padded to a multiple of 10240 bytes, as ``tar`` writes it.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from data_pipeline.errors import CorruptData, DataError
from data_pipeline.storage import atomic_write

BLOCK = 512
TAR_RECORD = 10240  # tar pads archives to a multiple of 20 blocks
_NAME_ROW_DIGITS = 8
_MTIME_OFF, _MTIME_DIGITS = 136, 11
_CHKSUM_OFF = 148
MEMBER_SUFFIX = ".tokens.npy"


def _ceil_block(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def shard_name(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}.tar"


def member_prefix(split: str, shard: int) -> str:
    return f"{split}-{shard:06d}-"


@dataclass(frozen=True)
class RowFormat:
    """Byte layout of one record; the same for every row of a dataset."""

    row_tokens: int  # seq_len + 1
    dtype: str  # "uint16" or "uint32"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    @cached_property
    def npy_header(self) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": self.np_dtype.str, "fortran_order": False, "shape": (self.row_tokens,)})
        return buf.getvalue()

    @property
    def data_bytes(self) -> int:
        return self.row_tokens * self.np_dtype.itemsize

    @property
    def member_bytes(self) -> int:
        return len(self.npy_header) + self.data_bytes

    @property
    def data_offset(self) -> int:  # from the record start to the first token
        return BLOCK + len(self.npy_header)

    @property
    def record_bytes(self) -> int:
        return BLOCK + _ceil_block(self.member_bytes)

    def shard_bytes(self, rows: int) -> int:
        body = rows * self.record_bytes + 2 * BLOCK
        return -(-body // TAR_RECORD) * TAR_RECORD

    def to_dict(self) -> dict[str, Any]:
        return {"row_tokens": self.row_tokens, "dtype": self.dtype, "record_bytes": self.record_bytes,
                "data_offset": self.data_offset, "member_suffix": MEMBER_SUFFIX}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RowFormat":
        fmt = cls(int(d["row_tokens"]), str(d["dtype"]))
        if fmt.record_bytes != d.get("record_bytes", fmt.record_bytes):
            raise DataError(f"manifest row format {d} is inconsistent (record_bytes should be {fmt.record_bytes})")
        return fmt


# ---------------------------------------------------------------------------------------------
# Vectorized header fields (one numpy pass per shard instead of a tarfile call per row).

def _digits(values: np.ndarray, width: int, base: int) -> np.ndarray:
    """ASCII digits of ``values`` [n] -> uint8 [n, width], most significant first."""
    powers = base ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] // powers) % base + 48).astype(np.uint8)


def _parse_digits(field: np.ndarray, base: int) -> np.ndarray:
    """Inverse of _digits; a non-digit byte gives -1 for that row."""
    d = field.astype(np.int64) - 48
    ok = ((d >= 0) & (d < base)).all(axis=1)
    powers = base ** np.arange(field.shape[1] - 1, -1, -1, dtype=np.int64)
    return np.where(ok, (d * powers).sum(axis=1), -1)


def build_records(rows: np.ndarray, split: str, shard: int, first_row: int, fmt: RowFormat) -> np.ndarray:
    """Tar records for ``rows`` [n, row_tokens] -> uint8 [n, record_bytes]."""
    n = rows.shape[0]
    prefix = member_prefix(split, shard)
    info = tarfile.TarInfo(prefix + "0" * _NAME_ROW_DIGITS + MEMBER_SUFFIX)
    info.size, info.mode, info.mtime = fmt.member_bytes, 0o644, 0
    template = np.frombuffer(info.tobuf(format=tarfile.USTAR_FORMAT), dtype=np.uint8)
    rec = np.zeros((n, fmt.record_bytes), dtype=np.uint8)
    rec[:, :BLOCK] = template
    local = np.arange(first_row, first_row + n)
    rec[:, len(prefix):len(prefix) + _NAME_ROW_DIGITS] = _digits(local, _NAME_ROW_DIGITS, 10)
    header = fmt.npy_header
    rec[:, BLOCK:fmt.data_offset] = np.frombuffer(header, dtype=np.uint8)
    data = np.ascontiguousarray(rows, dtype=fmt.np_dtype)
    rec[:, fmt.data_offset:fmt.data_offset + fmt.data_bytes] = data.view(np.uint8).reshape(n, -1)
    head_crc = zlib.crc32(header)
    crcs = np.fromiter((zlib.crc32(data[i], head_crc) for i in range(n)), dtype=np.int64, count=n)
    rec[:, _MTIME_OFF:_MTIME_OFF + _MTIME_DIGITS] = _digits(crcs, _MTIME_DIGITS, 8)
    rec[:, _CHKSUM_OFF:_CHKSUM_OFF + 8] = ord(" ")
    chk = rec[:, :BLOCK].sum(axis=1, dtype=np.int64)
    rec[:, _CHKSUM_OFF:_CHKSUM_OFF + 6] = _digits(chk, 6, 8)
    rec[:, _CHKSUM_OFF + 6] = 0
    return rec


def bad_records(rec: np.ndarray, local_rows: np.ndarray, split: str, shard: int, fmt: RowFormat,
                check_crc: bool = True) -> list[tuple[int, str]]:
    """``(index, problem)`` for each record of ``rec`` [k, record_bytes] that is not row
    ``local_rows[index]`` of this shard or (``check_crc``) fails its CRC-32; [] when all are good."""
    prefix = member_prefix(split, shard)
    names = _parse_digits(rec[:, len(prefix):len(prefix) + _NAME_ROW_DIGITS], 10)
    out = [(int(i), "is not where the manifest says (truncated or corrupted shard)")
           for i in np.nonzero(names != local_rows)[0]]
    if check_crc:
        end = fmt.data_offset + fmt.data_bytes
        want = _parse_digits(rec[:, _MTIME_OFF:_MTIME_OFF + _MTIME_DIGITS], 8)
        misplaced = {i for i, _ in out}
        out += [(i, "fails its CRC-32 check (corrupted shard)") for i in range(rec.shape[0])
                if i not in misplaced and zlib.crc32(rec[i, BLOCK:end]) != want[i]]
    return sorted(out)


def corrupt_row_error(where: str, row: int, problem: str) -> CorruptData:
    return CorruptData(f"shard {where}: row {row} {problem}; re-run `slam-pretrain prepare`, or set "
                       "data.skip_corrupt_shards=true to skip damaged rows and shards")


def decode_records(rec: np.ndarray, local_rows: np.ndarray, split: str, shard: int, fmt: RowFormat,
                   where: str, check_crc: bool = True) -> np.ndarray:
    """Token rows [k, row_tokens] (a view into ``rec``) from records [k, record_bytes], checking
    names and CRC-32.

    ``where`` names the shard in the CorruptData raised for a record that is not what it should be.
    """
    bad = bad_records(rec, local_rows, split, shard, fmt, check_crc)
    if bad:
        i, problem = bad[0]
        raise corrupt_row_error(where, int(local_rows[i]), problem)
    return tokens_of(rec, fmt)


def tokens_of(rec: np.ndarray, fmt: RowFormat) -> np.ndarray:
    """The token rows [k, row_tokens] inside records [k, record_bytes] (a view, no checks)."""
    return rec[:, fmt.data_offset:fmt.data_offset + fmt.data_bytes].view(fmt.np_dtype)


class ShardWriter:
    """Packs rows into shards of ``rows_per_shard`` rows, written atomically (tmp + rename).

    The last rows stay in memory until ``close()`` so that the final, smaller shard and the
    validation fallback (``take_last``) never need to reopen a written file.
    """

    def __init__(self, out_dir: Path, split: str, fmt: RowFormat, rows_per_shard: int,
                 on_write: Optional[Callable[[int], None]] = None):
        if rows_per_shard >= 10**_NAME_ROW_DIGITS:
            raise DataError(f"data.shard_size_mb gives {rows_per_shard} rows per shard: must be < 10**8")
        self.out_dir, self.split, self.fmt, self.rows_per_shard = out_dir, split, fmt, rows_per_shard
        self.on_write = on_write
        self.shards: list[dict[str, Any]] = []
        self.rows_written = 0
        self._pending: list[np.ndarray] = []
        self._npending = 0

    def add(self, rows: np.ndarray) -> None:
        if rows.shape[0] == 0:
            return
        self._pending.append(rows)
        self._npending += rows.shape[0]
        while self._npending > self.rows_per_shard:  # keep at least one row back
            self._flush(self.rows_per_shard)

    @property
    def pending_rows(self) -> int:
        return self._npending

    def take_last(self, k: int) -> np.ndarray:
        """Remove and return the last ``k`` pending rows (k <= pending_rows)."""
        allrows = np.concatenate(self._pending) if self._pending else np.zeros((0, self.fmt.row_tokens))
        keep, taken = allrows[:allrows.shape[0] - k], allrows[allrows.shape[0] - k:]
        self._pending, self._npending = ([keep] if keep.shape[0] else []), keep.shape[0]
        return taken

    def close(self) -> list[dict[str, Any]]:
        while self._npending:
            self._flush(min(self._npending, self.rows_per_shard))
        return self.shards

    def _flush(self, n: int) -> None:
        allrows = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        rows, rest = allrows[:n], allrows[n:]
        self._pending, self._npending = ([rest] if rest.shape[0] else []), rest.shape[0]
        index = len(self.shards)
        name = shard_name(self.split, index)
        rec = build_records(rows, self.split, index, 0, self.fmt)
        size = self.fmt.shard_bytes(n)
        tail = bytes(size - rec.nbytes)
        sha = hashlib.sha256()
        sha.update(memoryview(rec).cast("B"))
        sha.update(tail)
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                f.write(memoryview(rec).cast("B"))
                f.write(tail)

        atomic_write(self.out_dir / name, write)
        self.shards.append({"url": name, "rows": n, "bytes": size, "sha256": sha.hexdigest()})
        self.rows_written += n
        if self.on_write:
            self.on_write(size)
