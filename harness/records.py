"""The versioned run record, `reports/<run-id>/run.json`: the one file every report renders from.

    harness compare --config configs/default.yaml      # writes one (and reports/latest)
    python -m harness.records reports/latest           # reads it back, prints its headline facts

The run id is the UTC time plus a short hash of the resolved config. Per-position data lies in
files beside the record, named in `files`. `read()` accepts every schema version up to this one.

Schema history:
  1  pairs (aggregates, per-prompt rows, positions file), matrix, variants, machine {platform, cpus}
  2  status/error, git, machine (cpu, ram, gpu), versions, seed, batch_size, `inputs` (prompt and
     tokenizer fingerprints), per-variant warp summary, `files` (tokens, top tokens), `throughput`
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import zipfile
import zlib
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from harness import paths
from harness.record_shapes import Aggregates, MatrixCell, PromptRow, Throughput, Tokens, checked, first_error

SCHEMA_VERSION = 2
LIBRARIES = ("torch", "transformers", "gptqmodel", "optimum", "safetensors", "numpy", "scipy", "harness")
_DISTRIBUTIONS = {"harness": "qwen-compare-harness"}


class RecordError(ValueError):
    """A run record that cannot be read: missing, not JSON, from a newer schema, or malformed."""


class PairRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    reference: str
    candidate: str
    aggregates: dict  # every aggregate.pair_aggregates() value, plus kl_floor_multiple
    prompts: list[dict]  # aggregate.per_prompt() rows
    positions_file: str  # .npz of per-position metric arrays, beside run.json

    @field_validator("aggregates")
    @classmethod
    def _aggregates(cls, value: dict) -> dict:
        return checked(Aggregates, value)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, value: list[dict]) -> list[dict]:
        return [checked(PromptRow, row, str(i)) for i, row in enumerate(value)]


class RunRecord(BaseModel):
    model_config = ConfigDict(extra="allow")  # a reader keeps what a newer minor writer added
    schema_version: int
    run_id: str = ""
    status: Literal["ok", "error"]
    error: str | None = None
    created_at: str
    git: dict | None = None  # {"commit", "dirty"}
    machine: dict = {}
    versions: dict = {}
    seed: int | None = None
    batch_size: int | None = None
    config: dict = {}
    inputs: dict = {}  # prompts file and sha256, token ids' sha256, reference tokenizer's sha256, counts
    variants: dict[str, dict] = {}  # name -> source, dtype, device, parameters, load_s, extract_s, warp, ...
    noise_floor: str | None = None
    pairs: list[PairRecord] = []
    matrix: list[dict] = []  # {"a", "b", "top1_agree", "sym_kl_mean"}
    files: dict[str, str] = {}  # what -> file name beside run.json ("tokens", "top_tokens")
    throughput: dict | None = None  # the last JSON line of `harness bench`, when one was attached

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, dict]) -> dict[str, dict]:
        for name, facts in value.items():  # the one fact a reader computes with (html_report.rounding_note)
            added = facts.get("store_rounding_kl")
            if added is not None and (isinstance(added, bool) or not isinstance(added, (int, float))):
                raise ValueError(f"{name}.store_rounding_kl is {added!r}, not a number")
        return value

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, value: list[dict]) -> list[dict]:
        return [checked(MatrixCell, cell, str(i)) for i, cell in enumerate(value)]

    @field_validator("throughput")
    @classmethod
    def _throughput(cls, value: dict | None) -> dict | None:
        return value if value is None else checked(Throughput, value)

    @property
    def reference(self) -> str | None:
        return self.pairs[0].reference if self.pairs else self.config.get("reference", {}).get("name")


def json_safe(obj):
    """Strict JSON for other readers (browsers, jq): NaN becomes null, ±inf the strings "inf"/"-inf"."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf") if math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def run_id(config_json: str, now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + hashlib.sha256(config_json.encode()).hexdigest()[:8]


def new_run_dir(reports_dir: Path, config_json: str) -> tuple[Path, datetime]:
    """A new run folder, this process's own: two runs of one config in the same second (or a run and its error
    record) get `<id>`, `<id>-2`, ..., never one folder between them."""
    now = datetime.now(timezone.utc)
    base = Path(reports_dir) / run_id(config_json, now)
    for n in range(1, 1000):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            out.mkdir(parents=True)
            return out, now
        except FileExistsError:
            continue
        except OSError as exc:
            raise RecordError(f"key 'reports_dir': cannot make the run folder {out}: {exc.strerror or exc}") from None
    raise RecordError(f"key 'reports_dir': {base}-2 to -999 exist already: cannot make a new run folder there")


def check_writable(reports_dir: Path) -> None:
    """Fails now, before any model runs, where the run folder could not be written at the end."""
    if why := paths.unwritable(reports_dir):
        raise RecordError(f"key 'reports_dir': cannot write run folders in {reports_dir}: {why}")


def git_state(where: Path | None = None) -> dict | None:
    """The commit of the harness's own checkout (not of the folder it is run from), and whether its tree had
    changes; None where the harness is not in a git checkout (installed as a package)."""
    cwd = where or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if commit.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def environment() -> dict:
    """Machine, library versions and git state: what a number depends on besides the config."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = importlib.metadata.version(_DISTRIBUTIONS.get(lib, lib))
        except importlib.metadata.PackageNotFoundError:
            versions[lib] = None
    machine = {
        "platform": platform.platform(), "cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "ram_gib": _ram_gib(), "gpu": gpu, "hostname": platform.node(),
    }  # fmt: skip
    return {"machine": machine, "versions": versions, "git": git_state()}


def write(run_dir: Path, record: RunRecord) -> Path:
    """Writes run.json atomically (a reader never sees half a record)."""
    path = Path(run_dir) / "run.json"
    tmp = path.with_name(f".run.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record.model_dump(), indent=2, default=str, allow_nan=True) + "\n")
    os.replace(tmp, path)
    return path


def point_latest(reports_dir: Path, run_dir: Path) -> None:
    latest = Path(reports_dir) / "latest"
    tmp = latest.with_name(f".latest.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(Path(run_dir).name)
    os.replace(tmp, latest)


def _side_file(path: Path, what: str, exc: Exception) -> RecordError:
    return RecordError(f"{path}: {what} that run.json names cannot be read ({exc}); the run folder is incomplete or "
                       "damaged: run `harness compare` again")


def load_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    """Every array of an .npz beside a record; a missing, cut short or foreign file is a RecordError naming it."""
    try:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # missing, cut short, or not an .npz
        raise _side_file(path, what, exc) from None


POSITION_ARRAYS = ("kl", "prompt", "position", "target")  # what every reader of a positions file takes from it


def load_positions(run_dir: Path, pair: PairRecord) -> dict[str, np.ndarray]:
    """Every per-position array of one pair ([P] each: the metrics, prompt, position, target). Arrays missing, of
    another length than the pair's positions, or not one-dimensional are a RecordError naming the file."""
    path, what = Path(run_dir) / pair.positions_file, f"the per-position data of pair {pair.candidate!r}"
    arrays = load_npz(path, what)
    n = pair.aggregates["positions"]
    if missing := [k for k in POSITION_ARRAYS if k not in arrays]:
        raise _side_file(path, what, ValueError(f"it lacks the array(s) {', '.join(missing)}"))
    if wrong := [f"{k} {tuple(a.shape)}" for k, a in arrays.items() if a.shape != (n,)]:
        raise _side_file(path, what, ValueError(f"the pair has {n} positions, but its arrays' shapes are {', '.join(wrong)}"))
    return arrays


def load_tokens(run_dir: Path, record: RunRecord) -> dict | None:
    """tokens.json beside the record (each prompt's ids and texts, the text of every id shown), if it names one."""
    name = record.files.get("tokens")
    if not name:
        return None
    path = Path(run_dir) / name
    try:
        tokens = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise _side_file(path, "the prompts' tokens", exc) from None
    if not isinstance(tokens, dict) or not {"prompts", "vocab"} <= set(tokens):
        raise _side_file(path, "the prompts' tokens", ValueError("not an object with 'prompts' and 'vocab'"))
    try:
        checked(Tokens, tokens)
    except ValueError as exc:
        raise _side_file(path, "the prompts' tokens", exc) from None
    if (n := record.inputs.get("prompts")) is not None and len(tokens["prompts"]) != n:
        raise _side_file(path, "the prompts' tokens", ValueError(
            f"it holds {len(tokens['prompts'])} prompts, the run had {n}; before 2026-12-07 a run whose prompts did not all "
            "give a scored position wrote those that did only, and named positions by the wrong prompts"))  # fmt: skip
    return tokens


def _upgrade_1(raw: dict) -> dict:
    """Schema 1 had no status detail, versions, git, seed or side files: fill what can be known."""
    raw = dict(raw)
    cfg = raw.get("config", {})
    raw.setdefault("seed", cfg.get("seed"))
    raw.setdefault("batch_size", cfg.get("batch_size"))
    raw.setdefault("files", {})
    raw["schema_version"] = 2
    return raw


_UPGRADES = {1: _upgrade_1}


def upgrade(raw: dict, source: str = "run.json") -> dict:
    version = raw.get("schema_version")
    if not isinstance(version, int):
        raise RecordError(f"{source}: no integer 'schema_version'; this is not a harness run record")
    if version > SCHEMA_VERSION:
        raise RecordError(
            f"{source}: schema_version {version} is newer than this harness reads ({SCHEMA_VERSION}); "
            "update the harness to read it"
        )
    while version < SCHEMA_VERSION:
        raw = _UPGRADES[version](raw)
        version = raw["schema_version"]
    return raw


def schema_of(path: Path) -> int | None:
    """The schema version a record was written with (read() upgrades it), or None where there is none."""
    path = Path(path)
    try:
        raw = json.loads((path / "run.json" if path.is_dir() else path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw.get("schema_version") if isinstance(raw, dict) else None


def run_dir(path) -> Path:
    """A run's folder, given the folder or its run.json."""
    path = Path(path)
    if path.is_file() and path.name != "run.json":
        raise RecordError(f"{path} is a file, not a run folder or its run.json")
    return path.parent if path.is_file() else path


def read(path: Path) -> RunRecord:
    """A run record from `run.json` or its folder, upgraded to the current schema."""
    path = Path(path)
    if path.is_dir():
        path = path / "run.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: no run record there (expected the run.json that `harness compare` writes)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: cannot read the run record: {exc}") from None
    if not isinstance(raw, dict):
        raise RecordError(f"{path}: a run record is a JSON object, this is a {type(raw).__name__}")
    raw = upgrade(raw, str(path))
    if raw.get("status") == "ok" and "pairs" not in raw:  # every finished run's record lists them, maybe none
        raise RecordError(f"{path}: key 'pairs' is missing: the record of a finished run lists its pairs; the file is "
                          "damaged: run `harness compare` again")  # fmt: skip
    try:
        record = RunRecord.model_validate(raw)
    except ValidationError as exc:
        where, why = first_error(exc)
        raise RecordError(f"{path}: key {where!r}: {why}. The record was changed by hand or damaged; `harness compare` "
                          "writes it again") from None  # fmt: skip
    return record if record.run_id else record.model_copy(update={"run_id": path.resolve().parent.name})


if __name__ == "__main__":
    from harness import script

    rec = read(Path((script.args(__doc__, 0, 1) or ["reports/latest"])[0]))
    print(f"{rec.run_id} schema {rec.schema_version} {rec.status} {rec.created_at} git {rec.git}")
    for p in rec.pairs:
        print(f"{p.candidate:<28} kl_mean {p.aggregates['kl_mean']:.3e} top1 {p.aggregates['top1_agree']:.4f}")
