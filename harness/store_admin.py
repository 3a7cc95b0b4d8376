"""What the store folder holds, and pruning it to what kept runs use.

    harness store list                                # every store and cached generation, sizes, total
    harness store list --keep reports/latest          # ... and which of them that run uses
    harness store prune --keep reports/latest --dry-run   # what would go
    harness store prune --keep reports/               # every run under reports/ keeps what it used

A store is ~0.3 MB per scored position and model (float16), so stores pile up: every dtype, batch size,
prompt set or rebuilt checkpoint gets its own key. A run record names the store of each of its models
(`variants.<name>.store`) and, in generate mode, the reference's cached greedy continuations
(`inputs.generations`); `prune --keep` removes every entry of the store folder ($HARNESS_STORE, else
$HARNESS_HOME/store) that none of the kept runs names, matched by key (the folder or file name), so a
store folder that moved keeps its matches. Entries a writer may be at work on (a temporary file written in
the last BUSY_S seconds or by a live process here, an unfinished store written to in the last BUSY_S seconds, a
locked generation progress file) are left alone;
anything in the folder that is not a store or a generation cache is never touched.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from harness import paths, records
from harness.store import BUSY_S, Store, writer_alive

KEY = re.compile(r"[0-9a-f]{20}")  # store.store_key's length


@dataclass(frozen=True)
class Entry:
    key: str  # the store folder's name, or the generation cache's file stem
    kind: str  # "store" or "generations"
    paths: tuple[Path, ...]  # what removing the entry deletes (one folder, or the cache's files)
    model: str  # model name and source from the store's index.json ("?" where it has none)
    dtype: str
    shards: str  # "done/planned" shards ("done/?" where index.json is missing: the filling run never finished)
    size: int  # bytes
    modified: float  # last written or reused (newest mtime), seconds since the epoch
    busy: bool  # a writer may be at work on it
    temporary: tuple[Path, ...] = ()  # writers' temporary files (dead ones where not busy)


def _size_and_mtime(files: list[Path]) -> tuple[int, float]:
    size, newest = 0, 0.0
    for f in files:
        try:
            st = f.lstat()
        except FileNotFoundError:  # removed while listed
            continue
        size, newest = size + st.st_size, max(newest, st.st_mtime)
    return size, newest


def _locked(path: Path) -> bool:
    """Whether another process holds the flock of a generation's `.progress.jsonl` (greedy._progress)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)  # not O_CREAT: a file gone meanwhile stays gone
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no flock on this file system: go by the file's age
        return time.time() - os.fstat(fd).st_mtime < BUSY_S
    finally:
        os.close(fd)  # closing drops the lock taken here
    return False


def entries(root: Path | None = None) -> list[Entry]:
    """Every store and generation cache in the store folder, oldest first."""
    root = paths.store_dir() if root is None else Path(root)
    now, found = time.time(), []
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and KEY.fullmatch(p.name)):
        files = [f for f in folder.iterdir() if f.is_file()]
        index = Store(folder).index() or {}
        model = index.get("model") if isinstance(index.get("model"), dict) else {}
        planned = (index.get("facts") or {}).get("shards", "?") if isinstance(index.get("facts"), dict) else "?"
        done = sum(1 for f in files if re.fullmatch(r"shard-\d{5}\.json", f.name))
        size, modified = _size_and_mtime(files)
        modified = max(modified, folder.stat().st_mtime)  # extract touches the folder on each reuse
        busy = any(writer_alive(f, now) for f in files if ".tmp-" in f.name)
        if str(done) != str(planned) and now - modified < BUSY_S:  # unfinished, lately: maybe between two shards
            busy = True
        name = f"{model.get('name', '?')} ({model.get('source', '?')})" if model else "?"
        found.append(Entry(folder.name, "store", (folder,), name, str(model.get("dtype", "?")), f"{done}/{planned}",
                           size, modified, busy, tuple(f for f in files if ".tmp-" in f.name)))  # fmt: skip
    generations = root / "generations"
    if generations.is_dir():
        groups: dict[str, list[Path]] = {}
        for f in generations.iterdir():
            key = f.name.lstrip(".").split(".", 1)[0]
            if f.is_file() and KEY.fullmatch(key):
                groups.setdefault(key, []).append(f)
        for key, files in sorted(groups.items()):
            size, modified = _size_and_mtime(files)
            busy = any(_locked(f) for f in files if f.name.endswith(".progress.jsonl")) or any(
                writer_alive(f, now) for f in files if ".tmp-" in f.name
            )
            model = "?"
            merged = generations / f"{key}.json"
            try:
                model = str(json.loads(merged.read_text()).get("model", "?")) if merged.is_file() else "(unfinished)"
            except (OSError, ValueError, AttributeError):
                pass
            found.append(Entry(key, "generations", tuple(sorted(files)), model, "", "", size, modified, busy,
                               tuple(f for f in files if ".tmp-" in f.name)))  # fmt: skip
    return sorted(found, key=lambda e: e.modified)


def _runs(path: Path) -> list[Path]:
    """The run.json files of a run folder, a run.json, or a reports folder (each run folder in it)."""
    path = Path(path)
    if path.is_file() or (path / "run.json").is_file():
        return [records.run_dir(path) / "run.json"]
    if not path.is_dir():
        raise records.RecordError(f"--keep {path}: no such run folder, run.json or reports folder")
    found = sorted(p / "run.json" for p in path.iterdir() if p.is_dir() and not p.is_symlink() and (p / "run.json").is_file())
    if not found:
        raise records.RecordError(f"--keep {path}: a folder with no run.json in it or in its subfolders (a run folder, "
                                  "its run.json, or a reports folder of run folders)")  # fmt: skip
    return found


def kept_keys(keep: list[Path], log=print) -> set[str]:
    """The store and generation keys that the runs under `keep` name. A record that cannot be read is an error:
    pruning by a list that silently lost a run would delete that run's stores."""
    keys = set()
    for path in keep:
        for run in _runs(path):
            record = records.read(run)
            if not record.variants and not record.inputs.get("generations"):
                why = f"it failed: {record.error}" if record.status == "error" else "it holds no models"
                log(f"warning: --keep {run} names no store ({why}); the stores it was filling are not kept by it")
            for name, facts in record.variants.items():
                if isinstance(facts, dict) and facts.get("store"):
                    keys.add(Path(facts["store"]).name)
            if record.inputs.get("generations"):
                keys.add(Path(record.inputs["generations"]).stem)
    return keys


def prune(found: list[Entry], keep: set[str] | None, *, dry_run: bool = False) -> tuple[list[Entry], list[Entry]]:
    """Removes every entry whose key is not in `keep` (all of them where keep is None), except busy ones; a kept
    entry loses only its dead writers' temporary files. Returns (removed, skipped as busy)."""
    removed, skipped = [], []
    for entry in found:
        if keep is not None and entry.key in keep:
            if not (entry.busy or dry_run):
                for path in entry.temporary:
                    path.unlink(missing_ok=True)
            continue
        if entry.busy:
            skipped.append(entry)
            continue
        if not dry_run:
            for path in entry.paths:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        removed.append(entry)
    return removed, skipped


def size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n / 1e3:,.1f} kB"


def table(found: list[Entry], keep: set[str] | None = None) -> str:
    lines = [f"{'key':<20}  {'kind':<11} {'shards':>7}  {'size':>12}  {'last used (UTC)':<16}  {'state':<7}  model"]
    for e in found:
        when = datetime.fromtimestamp(e.modified, timezone.utc).strftime("%Y-%m-%d %H:%M") if e.modified else "?"
        state = "busy" if e.busy else "" if keep is None else "kept" if e.key in keep else "unused"
        model = f"{e.model} {e.dtype}".rstrip()
        lines.append(f"{e.key:<20}  {e.kind:<11} {e.shards:>7}  {size_text(e.size):>12}  {when:<16}  {state:<7}  {model}")
    total = sum(e.size for e in found)
    lines.append(f"{len(found)} entries, {size_text(total)}" + (
        "" if keep is None else f"; the kept runs use {sum(e.key in keep for e in found)} of them "
        f"({size_text(sum(e.size for e in found if e.key in keep))})"))  # fmt: skip
    return "\n".join(lines)


def main(action: str, keep: list[Path], everything: bool, dry_run: bool, log=print) -> int:
    root = paths.store_dir()
    var = paths.store_var()
    if root.exists() and not root.is_dir():
        raise records.RecordError(f"the store folder {root} ({var}) is a file, not a folder: point HARNESS_STORE at the "
                                  "folder your runs extracted into")  # fmt: skip
    try:
        found = entries(root)
    except OSError as exc:
        raise records.RecordError(f"the store folder {root} ({var}) cannot be read: {exc.strerror or exc}") from None
    keys = kept_keys(keep, log) if keep else None
    if action == "list" and (everything or dry_run):
        raise records.RecordError("harness store list: --all and --dry-run are options of prune")
    if action == "list":
        log(f"store folder: {root}" + ("" if root.is_dir() else f" ({var}): not there, so no run has extracted into it yet"))
        log(table(found, keys))
        return 0
    if keys is None and not everything:
        raise records.RecordError("harness store prune needs --keep RUN... (the runs whose stores stay: run folders, "
                                  "run.json files or reports folders) or --all (remove every store)")  # fmt: skip
    if keys is not None and everything:
        raise records.RecordError("harness store prune: --keep and --all exclude each other")
    if keys is not None and not keys and found:  # a failed run's record (say) names nothing: keeping it keeps nothing
        raise records.RecordError(f"harness store prune: the runs given to --keep ({', '.join(map(str, keep))}) name no "
                                  f"store, so all {len(found)} entries would go: keep a finished run (e.g. "
                                  "reports/latest), or use --all to remove everything")  # fmt: skip
    removed, skipped = prune(found, keys, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for e in removed:
        log(f"{verb} {e.kind} {e.key} ({size_text(e.size)}) {e.model} {e.dtype}".rstrip())
    for e in skipped:
        log(f"left alone {e.kind} {e.key}: a writer may be at work on it (a temporary file of a live process or younger "
            f"than {BUSY_S:.0f} s, a locked progress file, or an unfinished store written to in the last {BUSY_S:.0f} s); "
            "prune again once it has been quiet that long")  # fmt: skip
    log(f"{root}: {verb} {len(removed)} of {len(found)} entries, {size_text(sum(e.size for e in removed))}; "
        f"{len(found) - len(removed)} left ({size_text(sum(e.size for e in found) - sum(e.size for e in removed))})")
    return 0
