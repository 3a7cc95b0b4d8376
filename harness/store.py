"""On-disk store of one variant's log-probs: safetensors shards under `$HARNESS_HOME/store/<key>/`.

    python -m harness.store KEY_DIR      # prints what a store holds and whether it verifies

A shard holds consecutive prompts: `logprobs` [P, V] (float32 or float16, log-softmax over the real
ids, renormalised on read), `target` [P] int64 (the actual next token), `prompt` [P] int64 (prompt
index), `pad_mass` [P] float32 (probability the raw row put on the padding columns). The key hashes
everything the numbers depend on, so a second run reuses a store and an interrupted one resumes at
the first missing shard. A shard is written under a temporary name and renamed; its sidecar JSON
(bytes, crc32) is written after it, so a shard without a matching sidecar is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SHARD_POSITIONS = 1024  # positions per shard, give or take one prompt


def store_key(**parts) -> str:
    """Short sha256 of what the stored numbers depend on (source, revision, dtype, ids, settings)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def crc32_file(path: Path) -> int:
    """A checksum to catch torn or corrupted shards; crc32 reads ~1.6x faster than sha256 here."""
    crc = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


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

    def is_complete(self, index: int) -> bool:
        """A shard counts only if its sidecar exists and its size and crc32 match."""
        path, meta = self.shard_path(index), self.shard_path(index).with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return False
        try:
            want = json.loads(meta.read_text())
        except ValueError:
            return False
        return path.stat().st_size == want.get("bytes") and crc32_file(path) == want.get("crc32")

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor], info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.shard_path(index)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
        meta = {**info, "bytes": path.stat().st_size, "crc32": crc32_file(path)}
        tmp_meta = path.with_name(f".{path.stem}.json.tmp-{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=2))
        os.replace(tmp_meta, path.with_suffix(".json"))

    def write_index(self, info: dict) -> None:
        tmp = self.root / f".index.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(info, indent=2, default=str))
        os.replace(tmp, self.root / "index.json")

    def index(self) -> dict | None:
        path = self.root / "index.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def shards(self) -> list[Path]:
        return sorted(self.root.glob("shard-*.safetensors"))

    def read(self, name: str) -> torch.Tensor:
        """A small per-position tensor (`target`, `prompt`, `pad_mass`, ...) over all shards."""
        parts = []
        for path in self.shards():
            with safe_open(path, "pt") as f:
                parts.append(f.get_tensor(name))
        return torch.cat(parts)

    def blocks(self, rows: int, *, renormalise: bool = True):
        """Yields [<=rows, V] float32 log-prob blocks in position order (memory-mapped reads).

        Stored rows are rounded to the store dtype, so they sum to 1 only approximately; they are
        renormalised here unless the caller does it itself (metrics.normalize does, in float64).
        """
        for path in self.shards():
            with safe_open(path, "pt") as f:
                sliced = f.get_slice("logprobs")
                n = sliced.get_shape()[0]
                for start in range(0, n, rows):
                    block = sliced[start : min(n, start + rows)].float()
                    if renormalise:  # float64 normaliser: a float32 log-softmax over 151646 columns is off by ~1e-5
                        block = block - torch.logsumexp(block.double(), dim=-1, keepdim=True).float()
                    yield block


if __name__ == "__main__":
    store = Store(Path(sys.argv[1]))
    print(json.dumps(store.index(), indent=2))
    for i, path in enumerate(store.shards()):
        print(path.name, "ok" if store.is_complete(i) else "INCOMPLETE")
