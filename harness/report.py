"""Writes a run's results into `reports/<run-id>/` and points `reports/latest` at it.

    harness compare --config configs/default.yaml      # ends by calling write_run()

`run.json` holds every aggregate of every pair, the all-pairs matrix and the per-variant facts;
`summary.csv` a row per pair, `prompts.csv` a row per (pair, prompt), `matrix.csv` a row per pair of
models, and `positions-<candidate>.npz` every per-position metric. The run id is the UTC time plus
a short hash of the resolved config, so two runs never collide.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from harness.compare import PairResult

SCHEMA_VERSION = 1
SUMMARY_COLUMNS = [
    "reference", "candidate", "positions", "kl_mean", "kl_mean_se", "kl_median", "kl_p99", "kl_max", "kl_rev_mean",
    "js_mean", "tv_mean", "top1_agree", "top1_agree_se", "top5_overlap", "delta_p_rms", "ppl_ref", "ppl_cand",
    "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_se", "kl_floor_multiple",
]  # fmt: skip


def run_id(config_json: str, now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + hashlib.sha256(config_json.encode()).hexdigest()[:8]


def add_floor(pairs: list[PairResult], floor: str | None) -> None:
    """Gives every pair's mean KL as a multiple of the noise-floor pair's (in place)."""
    if floor is None:
        return
    base = next(p for p in pairs if p.candidate == floor).aggregates["kl_mean"]
    for p in pairs:
        p.aggregates["kl_floor_multiple"] = p.aggregates["kl_mean"] / base if base > 0 else math.inf


def _csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_run(
    reports_dir: Path, config_json: str, pairs: list[PairResult], matrix: list[dict], variants: dict[str, dict],
    *, floor: str | None = None,
) -> Path:  # fmt: skip
    now = datetime.now(timezone.utc)
    out = Path(reports_dir) / run_id(config_json, now)
    out.mkdir(parents=True, exist_ok=True)
    _csv(out / "summary.csv", [{"reference": p.reference, "candidate": p.candidate, **p.aggregates} for p in pairs], SUMMARY_COLUMNS)
    prompt_rows = [{"reference": p.reference, "candidate": p.candidate, **row} for p in pairs for row in p.prompts]
    _csv(out / "prompts.csv", prompt_rows, list(prompt_rows[0]) if prompt_rows else ["reference"])
    _csv(out / "matrix.csv", matrix, ["a", "b", "top1_agree", "sym_kl_mean"])
    for p in pairs:
        np.savez_compressed(out / f"positions-{p.candidate}.npz", **p.positions)
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "created_at": now.isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": json.loads(config_json),
        "variants": variants,
        "noise_floor": floor,
        "pairs": [
            {"reference": p.reference, "candidate": p.candidate, "aggregates": p.aggregates, "prompts": p.prompts,
             "positions_file": f"positions-{p.candidate}.npz"}
            for p in pairs
        ],  # fmt: skip
        "matrix": matrix,
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    latest = Path(reports_dir) / "latest"
    tmp = latest.with_name(f".latest.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    os.replace(tmp, latest)
    return out


def table(pairs: list[PairResult], floor: str | None = None) -> str:
    head = (
        f"{'candidate':<22} {'positions':>9} {'kl_mean':>10} {'± se':>9} {'kl_p99':>9} {'js_mean':>9} "
        f"{'top1_agree':>10} {'ppl_ratio':>9}" + (f" {'x floor':>9}" if floor else "")
    )
    rows = []
    for p in pairs:
        a = p.aggregates
        row = (
            f"{p.candidate:<22} {a['positions']:>9} {a['kl_mean']:>10.3e} {a['kl_mean_se']:>9.1e} {a['kl_p99']:>9.2e} "
            f"{a['js_mean']:>9.2e} {a['top1_agree']:>10.4f} {a['ppl_ratio']:>9.4f}"
        )
        rows.append(row + (f" {a['kl_floor_multiple']:>9.3g}" if floor else ""))
    return "\n".join([f"reference: {pairs[0].reference}" if pairs else "", head, *rows])
