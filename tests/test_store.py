"""The shard writer: plain safetensors that safe_open reads back bit for bit, written in pieces,
checksummed, and never left half-written under the shard's name."""

from __future__ import annotations

import errno
import json
import os
import socket
import time

import pytest
import torch
from safetensors import safe_open

from harness import store


def _tensors(rows: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "logprobs": torch.log_softmax(torch.randn(rows, 1001, generator=gen), -1).to(dtype),
        "target": torch.randint(0, 1001, (rows,), generator=gen),
        "pad_mass": torch.rand(rows, generator=gen),
        "warp_finite": torch.randint(1, 20, (rows,), generator=gen, dtype=torch.int32),
    }


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_written_in_pieces_reads_back_exactly(tmp_path, dtype):
    s = store.Store(tmp_path / "s")
    t = _tensors(37, dtype)
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {"segments": [0, 3]})
    for start, stop in ((0, 5), (5, 6), (6, 30), (30, 37)):  # uneven batches, as extraction produces them
        writer.write_rows(start, t["logprobs"][start:stop])
    writer.close({k: v for k, v in t.items() if k != "logprobs"}, wait=False).result()
    assert s.is_complete(0)
    with safe_open(s.shard_path(0), "pt") as f:
        assert set(f.keys()) == set(t)
        for name, want in t.items():
            assert torch.equal(f.get_tensor(name), want), name
    meta = json.loads(s.shard_path(0).with_suffix(".json").read_text())
    assert meta["segments"] == [0, 3] and meta["xxh3_64"] == store.checksum_file(s.shard_path(0))
    assert torch.equal(torch.cat(list(s.blocks(10, renormalise=False))), t["logprobs"].float())
    # reuse: views of one buffer, each block right until the next is read
    assert torch.equal(torch.cat([b.clone() for b in s.blocks(10, renormalise=False, reuse=True)]), t["logprobs"].float())
    # native: the stored dtype, views of a private map; a write through one leaves the file as it was
    native = list(s.blocks(10, native=True))
    assert [len(b) for b in native] == [10, 10, 10, 7] and all(b.dtype == dtype for b in native)
    assert torch.equal(torch.cat(native), t["logprobs"])
    native[0][0, 0] = 123.0
    assert torch.equal(torch.cat(list(s.blocks(10, native=True))), t["logprobs"]) and s.is_complete(0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_aligned_rows_go_to_disk_with_o_direct_and_read_back_exactly(tmp_path, dtype, monkeypatch):
    s = store.Store(tmp_path / "s")
    t = _tensors(300, dtype)  # 1001 columns: rows end mid-block, so blocks straddle batches
    rows = store.aligned_empty(300, 1001, dtype)
    rows.copy_(t["logprobs"])
    assert rows.data_ptr() % store.ALIGN == 0
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {})
    if writer.direct is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT")
    calls, pwrite = [], store.os.pwrite
    monkeypatch.setattr(store.os, "pwrite", lambda fd, data, offset: calls.append((fd, len(data), offset)) or pwrite(fd, data, offset))
    direct = writer.direct
    for start, stop in ((0, 1), (1, 3), (3, 100), (100, 101), (101, 300)):
        writer.write_rows(start, rows[start:stop])
    writer.close({k: v for k, v in t.items() if k != "logprobs"}, wait=False).result()
    through_direct = [(n, off) for fd, n, off in calls if fd == direct]
    assert sum(n for n, _ in through_direct) >= rows.numel() * rows.element_size() - store.ALIGN  # all but the last block
    assert all(n % store.ALIGN == 0 and off % store.ALIGN == 0 for n, off in through_direct)
    assert s.is_complete(0)
    with safe_open(s.shard_path(0), "pt") as f:
        for name, want in t.items():
            assert torch.equal(f.get_tensor(name), want), name


def test_a_file_system_that_refuses_o_direct_writes_gets_the_page_cache(tmp_path, monkeypatch):
    s = store.Store(tmp_path / "s")
    t = _tensors(300, torch.float16)
    rows = store.aligned_empty(300, 1001, torch.float16)
    rows.copy_(t["logprobs"])
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {})
    if writer.direct is None:
        pytest.skip(f"the file system of {tmp_path} refuses O_DIRECT at open already")
    direct, pwrite, refused = writer.direct, store.os.pwrite, []

    def refuse(fd, data, offset):
        if fd == direct:
            refused.append(offset)
            raise OSError(errno.EINVAL, "Invalid argument")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(store.os, "pwrite", refuse)
    for start, stop in ((0, 100), (100, 300)):
        writer.write_rows(start, rows[start:stop])
    writer.close({k: v for k, v in t.items() if k != "logprobs"})
    assert len(refused) == 1 and s.is_complete(0)  # refused once, then the page cache for the rest
    with safe_open(s.shard_path(0), "pt") as f:
        for name, want in t.items():
            assert torch.equal(f.get_tensor(name), want), name


def test_rows_must_come_in_order_and_complete(tmp_path):
    s = store.Store(tmp_path / "s")
    t = _tensors(8, torch.float16)
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {})
    with pytest.raises(ValueError, match="expected row 0"):
        writer.write_rows(3, t["logprobs"][3:])
    writer.write_rows(0, t["logprobs"][:4])
    with pytest.raises(ValueError, match="4 log-prob rows written of 8"):
        writer.close({k: v for k, v in t.items() if k != "logprobs"})
    writer.abort()
    assert not s.is_complete(0) and list(s.root.iterdir()) == []  # nothing left behind


def test_a_failed_write_surfaces_and_leaves_no_shard(tmp_path, monkeypatch):
    s = store.Store(tmp_path / "s")
    t = _tensors(8, torch.float16)
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {})

    def full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "pwrite", full)
    writer.write_rows(0, t["logprobs"])
    with pytest.raises(OSError, match="No space left"):
        writer.close({k: v for k, v in t.items() if k != "logprobs"}, wait=False).result()
    writer.abort()
    assert not s.shard_path(0).exists() and list(s.root.iterdir()) == []


def test_a_failed_write_of_the_small_tensors_leaves_no_shard(tmp_path, monkeypatch):
    """The rows are all written and only the per-position tensors after them fail: the shard's name still never
    appears (a file there would be listed by Store.shards and read)."""
    s = store.Store(tmp_path / "s")
    t = _tensors(8, torch.float16)
    writer = s.shard_writer(0, {k: (v.dtype, tuple(v.shape)) for k, v in t.items()}, {})
    rows_end = writer.data_start + 8 * writer.row_bytes
    real = store.os.pwrite

    def full_after_the_rows(fd, data, offset):
        if offset >= rows_end:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(store.os, "pwrite", full_after_the_rows)
    writer.write_rows(0, t["logprobs"])
    with pytest.raises(OSError, match="No space left"):
        writer.close({k: v for k, v in t.items() if k != "logprobs"})
    writer.abort()
    assert not s.shard_path(0).exists() and list(s.root.iterdir()) == []


def test_a_shard_counts_only_if_its_checksum_and_segments_match(tmp_path):
    """Resume trusts a shard only where its bytes still hash to its sidecar's xxh3-64 (a flipped byte, same size, is a
    shard to redo, not data to compare) and it holds the planned range of segments."""
    s = store.Store(tmp_path / "s")
    s.write_shard(0, _tensors(8, torch.float16), {"segments": [0, 3]})
    assert s.is_complete(0) and s.is_complete(0, (0, 3))
    assert not s.is_complete(0, (0, 4)) and not s.is_complete(0, (1, 3))  # cut into shards differently: redone
    path = s.shard_path(0)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # one bit of the stored tensors, the file's size unchanged
    path.write_bytes(bytes(data))
    assert path.stat().st_size == len(data) and not s.is_complete(0)


def test_sweep_removes_only_the_temporary_files_of_dead_writers(tmp_path):
    """A writer killed mid-shard (no abort ran) leaves `.shard-NNNNN.safetensors.tmp-PID@HOST`; sweep removes those of
    a process gone from this machine (or, named without a host, old), and leaves a live writer's, here or elsewhere."""
    s = store.Store(tmp_path / "s")
    s.write_shard(0, _tensors(4, torch.float16), {})
    host, old = socket.gethostname(), time.time() - 2 * store.BUSY_S
    dead = [s.root / f".shard-00001.safetensors.tmp-999999999@{host}", s.root / f".shard-00001.json.tmp-999999999@{host}",
            s.root / ".index.json.tmp-999999999"]  # fmt: skip
    alive = [s.root / f".shard-00002.safetensors.tmp-{os.getpid()}@{host}", s.root / ".shard-00003.safetensors.tmp-7@elsewhere"]
    for p in dead + alive:
        p.write_bytes(b"partial")
    os.utime(dead[2], (old, old))
    assert sorted(s.sweep()) == sorted(dead)
    assert all(p.exists() for p in alive) and not any(p.exists() for p in dead)
    assert s.is_complete(0) and len(s.shards()) == 1


def test_blocks_renormalise_by_default(tmp_path):
    """Store.blocks() (renormalise=True, the default): each float16 row renormalised in float64, so that it sums to 1
    to float32 rounding (the stored rows only to float16's, ~1e-3), and otherwise the stored row."""
    s = store.Store(tmp_path / "s")
    t = _tensors(12, torch.float16)
    s.write_shard(0, t, {})
    raw = t["logprobs"].double()
    got = torch.cat(list(s.blocks(5)))
    assert torch.logsumexp(raw, -1).abs().max() > 1e-5  # the stored rows are off by more than the bound below
    assert torch.logsumexp(got.double(), -1).abs().max() < 1e-6
    torch.testing.assert_close(got.double(), raw - torch.logsumexp(raw, -1, keepdim=True), rtol=0, atol=1e-6)
