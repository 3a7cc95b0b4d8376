"""Writes a run's results: `reports/<run-id>/summary.csv` and `run.json`, and `reports/latest` -> it.

    harness compare --config configs/default.yaml      # ends by calling write_run()

The run id is the UTC time plus a short hash of the resolved config, so two runs never collide.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

from harness.compare import PairSummary

SCHEMA_VERSION = 1
SUMMARY_COLUMNS = [f.name for f in fields(PairSummary)]


def run_id(config_json: str, now: datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + hashlib.sha256(config_json.encode()).hexdigest()[:8]


def write_run(reports_dir: Path, config_json: str, pairs: list[PairSummary], variants: dict[str, dict]) -> Path:
    now = datetime.now(timezone.utc)
    out = Path(reports_dir) / run_id(config_json, now)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "summary.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for pair in pairs:
            writer.writerow(asdict(pair))
    record = {
        "schema_version": SCHEMA_VERSION,
        "status": "ok",
        "created_at": now.isoformat(),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "config": json.loads(config_json),
        "variants": variants,
        "pairs": [asdict(p) for p in pairs],
    }
    (out / "run.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    latest = Path(reports_dir) / "latest"
    tmp = latest.with_name(f".latest.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(out.name)
    os.replace(tmp, latest)
    return out


def table(pairs: list[PairSummary]) -> str:
    head = f"{'candidate':<28} {'positions':>9} {'kl_mean':>11} {'kl_max':>9} {'top1_agree':>10}"
    rows = [
        f"{p.candidate:<28} {p.positions:>9} {p.kl_mean:>11.3e} {p.kl_max:>9.3g} {p.top1_agree:>10.4f}" for p in pairs
    ]
    return "\n".join([f"reference: {pairs[0].reference}" if pairs else "", head, *rows])
