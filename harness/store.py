"""On-disk store of one variant's log-probs: safetensors shards under `$HARNESS_HOME/store/<key>/`.

    python -m harness.store KEY_DIR      # prints what a store holds and whether it verifies (exit 1 where not)

A shard holds consecutive prompts: `logprobs` [P, V] (float32 or float16, log-softmax over the real
ids, renormalised on read), `target` [P] int64 (the actual next token), `prompt` [P] int64 (prompt
index), `pad_mass` [P] float32 (probability the raw row put on the padding columns). The key hashes
everything the numbers depend on, so a second run reuses a store and an interrupted one resumes at
the first missing shard. A shard is written under a temporary name and renamed; its sidecar JSON
(bytes, xxh3-64 checksum) is written after it, so a shard without a matching sidecar is redone.

Shards are written while they fill (ShardWriter): the header first (every shape is known up front),
then the log-prob rows batch by batch from a background thread, then the small per-position
tensors, so the disk works while the model runs. The file is plain safetensors: `logprobs` first, at
a 4 KB-aligned offset (the header is padded with spaces, as the format allows).

Log-prob rows go to disk with O_DIRECT where the file system takes it and the rows sit in memory at
the same 4 KB alignment as in the file (`aligned_empty` makes such buffers; extraction fills them):
the disk reads them straight from the buffer. Through the page cache, each 0.3 MB row cost ~0.2 ms
of CPU to copy into fresh cache pages, and as much again to write back later, taken from the forward
pass on a 2-core machine. Whatever is not aligned (a row's last partial 4 KB, the small tensors, any
other buffer) goes through the page cache; `HARNESS_DIRECT_IO=0` sends everything that way.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import socket
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open

SHARD_POSITIONS = 512  # positions per shard, give or take one prompt; extraction holds two shards at most
BUSY_S = 600.0  # a temporary file written to this lately may be a live writer's on another machine sharing the folder
ALIGN = 4096  # O_DIRECT's alignment of memory, file offset and length (a page: enough for every block size)
DIRECT_IO = os.environ.get("HARNESS_DIRECT_IO", "1") != "0"


def aligned_empty(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised [rows, cols] tensor whose data starts on an ALIGN boundary (for O_DIRECT writes)."""
    nbytes = rows * cols * torch.empty(0, dtype=dtype).element_size()
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGN
    return raw[skip : skip + nbytes].view(dtype).view(rows, cols)


def _memory(addr: int, nbytes: int) -> memoryview:
    """The bytes at [addr, addr + nbytes) of a live tensor, without a copy."""
    return memoryview((ctypes.c_char * nbytes).from_address(addr)).cast("B")


def writer_tag() -> str:
    """Ends a writer's temporary file names (`….tmp-PID@HOST`): `writer_alive` tells a dead writer's from a live one."""
    return f"{os.getpid()}@{socket.gethostname()}"


def writer_alive(tmp: Path, now: float | None = None) -> bool:
    """Whether the writer of a temporary file may still be at work: a live process of this machine; on another machine
    sharing the folder (or a name without the host), one that wrote to it in the last BUSY_S seconds."""
    try:
        age = (time.time() if now is None else now) - tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    pid, _, host = tmp.name.rpartition(".tmp-")[2].partition("@")
    if host and host != socket.gethostname():
        return age < BUSY_S
    if pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False if host else age < BUSY_S
        except PermissionError:  # another user's live process
            return True
        return True
    return age < BUSY_S


def store_key(**parts) -> str:
    """Short sha256 of what the stored numbers depend on (source, revision, dtype, ids, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def checksum_file(path: Path) -> str:
    """xxh3-64 of a file: catches torn or corrupted shards, at ~10 GB/s (crc32 ran at ~2, sha256 slower)."""
    digest, buf = xxhash.xxh3_64(), bytearray(1 << 22)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:  # into one buffer: 12.3 GB/s from the page cache, 8.9 with a fresh 4 MB bytes a read
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


def plan_shards(lengths: list[int]) -> list[tuple[int, int]]:
    """Cuts prompts (with `lengths` scored positions each) into [start, stop) prompt ranges."""
    shards, start, count = [], 0, 0
    for i, n in enumerate(lengths):
        if count and count + n > SHARD_POSITIONS:
            shards.append((start, i))
            start, count = i, 0
        count += n
    shards.append((start, len(lengths)))
    return shards


@dataclass(frozen=True)
class Store:
    root: Path  # $HARNESS_HOME/store/<key>

    def shard_path(self, index: int) -> Path:
        return self.root / f"shard-{index:05d}.safetensors"

    def is_complete(self, index: int, segments: tuple[int, int] | None = None) -> bool:
        """A shard counts only if its sidecar exists, its size and checksum match, and (where given) it
        holds the planned [start, stop) range of segments: a store cut into shards differently is redone."""
        path, meta = self.shard_path(index), self.shard_path(index).with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return False
        try:
            want = json.loads(meta.read_text())
        except ValueError:
            return False
        if segments is not None and want.get("segments") != list(segments):
            return False
        return path.stat().st_size == want.get("bytes") and checksum_file(path) == want.get("xxh3_64")

    def shard_writer(self, index: int, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], info: dict) -> ShardWriter:
        """A writer for shard `index` holding the tensors of `layout` (name -> (dtype, shape)), `logprobs` first."""
        self.root.mkdir(parents=True, exist_ok=True)
        return ShardWriter(self.shard_path(index), layout, info)

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        """Writes a whole shard at once (tests, small stores): the same writer, fed in one go."""
        layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        writer = self.shard_writer(index, layout, info)
        try:
            writer.write_rows(0, tensors["logprobs"])
            writer.close({k: v for k, v in tensors.items() if k != "logprobs"})
        except BaseException:
            writer.abort()
            raise

    def write_index(self, info: dict) -> None:
        tmp = self.root / f".index.json.tmp-{writer_tag()}"
        try:
            tmp.write_text(json.dumps(info, indent=2, default=str))
            os.replace(tmp, self.root / "index.json")
        except BaseException:  # a full disk, say: no empty temporary left behind
            tmp.unlink(missing_ok=True)
            raise

    def index(self) -> dict | None:
        """What the run that filled the store wrote about it (its facts and timings); None where it is missing or
        damaged (the shards, each checked against its own sidecar, are what counts)."""
        path = self.root / "index.json"
        try:
            index = json.loads(path.read_text()) if path.is_file() else None
        except (ValueError, OSError):
            return None
        # a hand-edited or foreign file: only a mapping whose facts (where given) are one is an index
        if not isinstance(index, dict) or not isinstance(index.get("facts", {}), dict):
            return None
        if not isinstance(index.get("facts", {}).get("filled_by", {}), dict):
            index["facts"] = {k: v for k, v in index["facts"].items() if k != "filled_by"}
        return index

    def sweep(self) -> list[Path]:
        """Removes the temporary files of shard writers that were killed (SIGKILL, a power cut: no `abort()` ran), for
        a store whose every shard is complete. A writer still at work (one that began before the store was complete
        and redoes a shard another finished meanwhile) keeps its file: `writer_alive`."""
        now = time.time()
        left = sorted(p for p in self.root.glob(".*.tmp-*") if not writer_alive(p, now))
        for path in left:
            path.unlink(missing_ok=True)
        return left

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.safetensors"))

    def read(self, name: str) -> torch.Tensor:
        """A small per-position tensor (`target`, `prompt`, `pad_mass`, ...) over all shards."""
        parts = []
        for path in self.shards():
            with safe_open(path, "pt") as f:
                parts.append(f.get_tensor(name))
        return torch.cat(parts)

    def blocks(self, rows: int, *, renormalise: bool = True, reuse: bool = False, native: bool = False):
        """Yields [<=rows, V] float32 log-prob blocks in position order (memory-mapped reads).

        Stored rows are rounded to the store dtype, so they sum to 1 only approximately; they are
        renormalised here unless the caller does it itself (metrics.normalize does, in float64).
        `reuse` (without renormalise) yields views of one buffer, overwritten by the next block: no
        fresh allocation per block (over glibc's 32 MB mmap threshold, each would page-fault anew).
        `native` yields the stored rows as they are (their dtype, not renormalised): views of a memory
        map of each shard (mapped_logprobs), no copy at all.
        """
        if native:
            for path in self.shards():
                rows_of = mapped_logprobs(path)
                for start in range(0, len(rows_of), rows):
                    yield rows_of[start : start + rows]
            return
        buf = None
        for path in self.shards():
            with safe_open(path, "pt") as f:
                sliced = f.get_slice("logprobs")
                n = sliced.get_shape()[0]
                for start in range(0, n, rows):
                    part = sliced[start : min(n, start + rows)]
                    if reuse and not renormalise:
                        if buf is None:
                            buf = torch.empty(rows, part.shape[1], dtype=torch.float32)
                        yield buf[: len(part)].copy_(part)
                        continue
                    block = part.float()
                    if renormalise:  # float64 normaliser: a float32 log-softmax over 151646 columns is off by ~1e-5
                        block = block - torch.logsumexp(block.double(), dim=-1, keepdim=True).float()
                    yield block


_ST_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64", torch.int32: "I32"}


def mapped_logprobs(path: Path) -> torch.Tensor:
    """A shard's `logprobs` [P, V] in the stored dtype, as a view of a private memory map of the file: no copy; a
    write through it stays in this process (copy-on-write), the file never changes; the map lives as long as the
    tensor or any view of it."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(size))["logprobs"]
        dtype = {name: dt for dt, name in _ST_DTYPES.items()}[info["dtype"]]
        (start, end), shape = info["data_offsets"], info["shape"]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mmap, "MADV_SEQUENTIAL"):  # read ahead: the rows are read in order, once
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return torch.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + size + start).view(shape)


class ShardWriter:
    """One shard, written as it fills. `write_rows(start, rows)` queues log-prob rows for a background
    thread that writes them at their place in the file, in order, updating the checksum as it goes
    (with O_DIRECT, whole 4 KB blocks as soon as they are complete; a block that straddles two batches
    waits for the second); `close(small)` writes the rest and the other tensors after them, renames the
    file into place and writes the sidecar (bytes, xxh3-64); `close(small, wait=False)` does that in the
    background and returns a future. A write error surfaces as OSError from the next call (or the
    future); `abort()` removes the temporary file. Rows passed in must stay unchanged until the shard
    is closed."""

    def __init__(self, path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...]]], info: dict):
        order = ["logprobs", *(n for n in layout if n != "logprobs")]
        header, offset = {}, 0
        for name in order:
            dtype, shape = layout[name]
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % ALIGN)  # the data section starts 4 KB-aligned
        self.path, self.info, self.layout, self.order = path, info, layout, order
        self.tmp = path.with_name(f".{path.name}.tmp-{writer_tag()}")
        self.data_start = 8 + len(blob)
        self.size = self.data_start + offset
        self.row_bytes = header["logprobs"]["data_offsets"][1] // max(1, layout["logprobs"][1][0])
        self.next_row, self.digest = 0, xxhash.xxh3_64()
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.direct = None  # a second descriptor with O_DIRECT, where the file system takes it
        if DIRECT_IO and hasattr(os, "O_DIRECT"):
            try:
                self.direct = os.open(self.tmp, os.O_WRONLY | os.O_DIRECT)
            except OSError:  # tmpfs and some others refuse O_DIRECT: the page cache it is
                pass
        # log-prob bytes not on disk yet: at file offset `written`, in memory at `held` (contiguous with the rows
        # that follow, if they come from the same buffer); `rows_kept` keeps their tensors alive
        self.written, self.held, self.held_bytes, self.rows_kept = self.data_start, 0, 0, []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.pending: list = []
        self._write(struct.pack("<Q", len(blob)) + blob, 0)

    def _write(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        while view.nbytes:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n
        self.digest.update(data)

    def _check(self, wait: bool) -> None:
        """Raises the first write error; with `wait`, first lets every queued write finish."""
        while self.pending and (wait or self.pending[0].done()):
            self.pending.pop(0).result()

    def _write_held(self, everything: bool) -> None:
        """Writes the held log-prob bytes: whole 4 KB blocks with O_DIRECT where memory and file offset are
        aligned alike, the rest (with `everything`, or all of it when not aligned) through the page cache."""
        aligned = self.direct is not None and self.held % ALIGN == 0 and self.written % ALIGN == 0
        n = self.held_bytes - self.held_bytes % ALIGN if aligned else 0
        if n:
            view = _memory(self.held, n)
            done = 0
            try:
                while done < n:
                    done += os.pwrite(self.direct, view[done:], self.written + done)
            except OSError as exc:  # a file system that opens O_DIRECT but refuses the write: the page cache from here on
                if exc.errno != errno.EINVAL:
                    raise
                os.close(self.direct)
                self.direct, aligned, n = None, False, done
                view = view[:done]
            self.digest.update(view)
        if (everything or not aligned) and self.held_bytes > n:
            self._write(_memory(self.held + n, self.held_bytes - n), self.written + n)
            n = self.held_bytes
        self.written, self.held, self.held_bytes = self.written + n, self.held + n, self.held_bytes - n

    def _queue_rows(self, addr: int, nbytes: int) -> None:
        if self.held_bytes and addr != self.held + self.held_bytes:  # not right after the held bytes in memory
            self._write_held(everything=True)
        if not self.held_bytes:
            self.held = addr
        self.held_bytes += nbytes
        self._write_held(everything=False)

    def write_rows(self, start: int, rows: torch.Tensor) -> None:
        if start != self.next_row or rows.dtype != self.layout["logprobs"][0] or not rows.is_contiguous():
            raise ValueError(f"rows must come in order, contiguous, as {self.layout['logprobs'][0]} (expected row {self.next_row})")
        self._check(wait=False)
        self.rows_kept.append(rows)
        self.pending.append(self.pool.submit(self._queue_rows, rows.data_ptr(), rows.numel() * rows.element_size()))
        self.next_row += rows.shape[0]

    def close(self, small: dict[str, torch.Tensor], *, wait: bool = True):
        """Finishes the shard; with wait=False in the background, returning a future (OSError from .result())."""
        if self.next_row != self.layout["logprobs"][1][0]:
            raise ValueError(f"{self.path}: {self.next_row} log-prob rows written of {self.layout['logprobs'][1][0]}")
        if wait:
            return self._finish(small)
        future = self.pool.submit(self._finish, small, in_pool=True)
        self.pool.shutdown(wait=False)  # the queued writes and the finish still run
        return future

    def _finish(self, small: dict[str, torch.Tensor], in_pool: bool = False) -> None:
        self._check(wait=True)  # in the pool every queued write has run already (one worker, in order)
        self._write_held(everything=True)
        offset = self.data_start + self.next_row * self.row_bytes
        for name in self.order[1:]:
            t = small[name].contiguous()
            if (t.dtype, tuple(t.shape)) != self.layout[name]:
                raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)}, the layout says {self.layout[name]}")
            data = t.view(torch.uint8).numpy() if t.dtype == torch.bfloat16 else t.numpy()
            self._write(data, offset)
            offset += data.nbytes
        self._close_fds()
        self.rows_kept.clear()
        if not in_pool:
            self.pool.shutdown()
        os.replace(self.tmp, self.path)
        meta = {**self.info, "bytes": self.size, "xxh3_64": self.digest.hexdigest()}
        tmp_meta = self.path.with_name(f".{self.path.stem}.json.tmp-{writer_tag()}")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, self.path.with_suffix(".json"))

    def abort(self) -> None:
        """Lets queued writes finish (or fail), then removes the temporary file."""
        for future in self.pending:
            future.exception()
        self.pending.clear()
        self.pool.shutdown()
        self._close_fds()
        self.rows_kept.clear()
        self.tmp.unlink(missing_ok=True)

    def _close_fds(self) -> None:
        for fd in (self.fd, self.direct):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct = None


if __name__ == "__main__":
    from harness import script

    store = Store(Path(script.args(__doc__, 1, 1)[0]))
    print(json.dumps(store.index(), indent=2))
    complete = [store.is_complete(i) for i in range(len(store.shards()))]
    for path, ok in zip(store.shards(), complete, strict=True):
        print(path.name, "ok" if ok else "INCOMPLETE")
    sys.exit(0 if complete and all(complete) else 1)  # a script can test a store
