"""Renders a run folder's reports from its record alone: CSV files and one self-contained index.html.

    harness compare --config configs/default.yaml      # ends by calling save_run(), then render()
    harness report reports/latest                      # re-renders without loading any model

Beside `run.json` (harness.records): `positions-<candidate>.npz` (every per-position metric of a
pair), `tokens.json` (each prompt's token ids and texts, and the text of every id the report shows)
and `top_tokens.npz` (each model's five most likely tokens per position). From those this writes
`summary.csv` (a row per pair), `prompts.csv` (pair x prompt), `matrix.csv` (all pairs of models),
`confidence.csv` and `depth.csv` (pair x bin of the reference's confidence, of context depth),
`positions.csv.gz` (pair x position), `kl_report.txt` (each pair in the rows and units of llama.cpp's
`--kl-divergence` report, for a CI log or a diff against one) and `index.html`.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
from pathlib import Path

import numpy as np

from harness import align, html_report, llama_report, records, token_view
from harness.compare import PairResult

SUMMARY_COLUMNS = [
    "reference", "candidate", "positions", "kl_mean", "kl_mean_se", "kl_median", "kl_p99", "kl_max", "kl_rev_mean",
    "js_mean", "tv_mean", "top1_agree", "top1_agree_se", "top5_overlap", "delta_p_rms", "ppl_ref", "ppl_cand",
    "ppl_ratio", "ln_ppl_ratio", "ln_ppl_ratio_se", "kl_floor_multiple", "kl_mean_se_prompts", "top1_agree_se_prompts",
    "ln_ppl_ratio_se_prompts",
]  # fmt: skip
# a pair of two vocabularies (cross_vocab): what its numbers are over, and bits per byte on each model's own tokens
CROSS_COLUMNS = list(align.AGGREGATES)
MATRIX_COLUMNS = ["a", "b", "top1_agree", "sym_kl_mean"]
BIN_COLUMNS = {  # the pair's binned aggregates, a CSV each (a run whose record has none: no file)
    "confidence.csv": ("by_confidence", ["p_top_lo", "p_top_hi", "positions", "kl_mean", "flip_rate"]),
    "depth.csv": ("by_depth", ["depth_lo", "depth_hi", "positions", "windows", "kl_mean", "kl_mean_se", "flip_rate", "ln_ppl_ratio",
                               "ln_ppl_ratio_se"]),
}
# in positions-*.npz beside the metrics (ref_row: cross_vocab; since 2026-12-07, depth: the tokens before it in its
# window, and window: the index of that window, the forward pass it was scored in)
POSITION_KEYS = ("prompt", "position", "depth", "window", "target", "ref_row")


def summary_columns(record: records.RunRecord) -> list[str]:
    """SUMMARY_COLUMNS with the run's own top-k overlaps (top5_overlap stands for them: metrics.top_k may not hold 5),
    without kl_floor_multiple where the run has no noise floor, and with CROSS_COLUMNS where a pair has them (empty in
    the other pairs' rows). The standard errors over prompts came last (2026-12-07), so that a reader by position
    still finds the others where they were."""
    first = record.pairs[0].aggregates if record.pairs else {}
    overlaps = sorted((k for k in first if re.fullmatch(r"top\d+_overlap", k)), key=lambda k: int(k[3:-8]))
    at = SUMMARY_COLUMNS.index("top5_overlap")
    columns = SUMMARY_COLUMNS[:at] + overlaps + SUMMARY_COLUMNS[at + 1 :]
    columns = columns if record.noise_floor else [c for c in columns if c != "kl_floor_multiple"]
    return columns + (CROSS_COLUMNS if any("aligned_of" in p.aggregates for p in record.pairs) else [])


def add_floor(pairs: list[PairResult], floor: str | None) -> str | None:
    """Gives every pair's mean KL as a multiple of the noise-floor pair's (in place), with its standard errors: per
    position, both means' relative errors combined (delta method for a ratio, the two taken as independent); over
    prompts, the difference A − multiple·F paired by prompt over F (gate_checks.paired_error, as a `max_x_floor` limit's
    band), or where the pairs do not pair (a cross_vocab pair, one prompt) their errors
    over prompts combined as the per-position ones. The floor pair's own multiple is 1 exactly. Returns a warning where
    the floor's mean KL is 0 (then every multiple is NaN)."""
    if floor is None:
        return None
    from harness.gate_checks import paired_error

    floor_pair = next(p for p in pairs if p.candidate == floor)
    f = floor_pair.aggregates
    base = f["kl_mean"]
    for p in pairs:
        a = p.aggregates
        a["kl_floor_multiple"] = r = a["kl_mean"] / base if base > 0 else math.nan
        for suffix in ("_se", "_se_prompts"):  # per position (llama.cpp's), and over prompts
            if f"kl_mean{suffix}" not in f:
                continue
            base_rel = f[f"kl_mean{suffix}"] / base if base > 0 else math.nan
            rel = a.get(f"kl_mean{suffix}", math.nan) / a["kl_mean"] if a["kl_mean"] > 0 else math.nan
            same = p.candidate == floor and base > 0
            a[f"kl_floor_multiple{suffix}"] = 0.0 if same else r * math.hypot(rel, base_rel)
        # over prompts, where they pair (one run's pairs share its prompts): se(A/F) = se(A − r·F) / F, delta method
        if p.candidate != floor and base > 0 and (paired := paired_error("kl_mean", p.prompts, floor_pair.prompts, r)) is not None:
            a["kl_floor_multiple_se_prompts"] = paired / base
    if base > 0:
        return None
    return (f"the noise floor pair {floor!r} has mean KL {base}: it gives the reference's distributions exactly, so no "
            "pair's mean KL is a multiple of it (x floor: NaN). Make noise_floor a pair with numerical noise of its own")


def save_run(
    run_dir: Path, record: records.RunRecord, pairs: list[PairResult], top: dict[str, tuple[np.ndarray, np.ndarray]],
    tokens: dict,
) -> records.RunRecord:  # fmt: skip
    """Writes the per-position files, then the record that names them; returns the record as written."""
    for p in pairs:
        np.savez_compressed(run_dir / f"positions-{p.candidate}.npz", **p.positions)
    np.savez_compressed(run_dir / "top_tokens.npz", **{f"{m}.{part}": a for m, (i, pr) in top.items() for part, a in (("ids", i), ("probs", pr))})
    (run_dir / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False))
    record = record.model_copy(update={
        "pairs": [
            records.PairRecord(reference=p.reference, candidate=p.candidate, aggregates=p.aggregates, prompts=p.prompts,
                               positions_file=f"positions-{p.candidate}.npz")
            for p in pairs
        ],
        "files": {"tokens": "tokens.json", "top_tokens": "top_tokens.npz"},
    })  # fmt: skip
    records.write(run_dir, record)
    return record


def _csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_positions_csv(run_dir: Path, record: records.RunRecord, tokens: dict | None) -> Path:
    """positions.csv.gz: a row per (pair, scored position) with every per-position metric."""
    path = Path(run_dir) / "positions.csv.gz"
    names = [p["id"] for p in tokens["prompts"]] if tokens else None
    vocab = tokens["vocab"] if tokens else {}
    with gzip.open(path, "wt", newline="", compresslevel=6) as f:
        writer = None
        for pair in record.pairs:
            m = records.load_positions(run_dir, pair)
            if writer is None:  # every pair has the same metrics (smoothing_eps and top_k are per run)
                metrics = [k for k in m if k not in POSITION_KEYS]
                where = ["position", "depth", "window"] if "depth" in m else ["position"]  # a run from before depth: none
                writer = csv.writer(f)
                writer.writerow(["reference", "candidate", "prompt", *where, "token", "token_text", *metrics])
            columns = [m[k].astype(np.int8) if m[k].dtype == bool else m[k] for k in metrics]
            at = [m[k] for k in where]
            for i in range(len(m["target"])):
                token = int(m["target"][i])
                prompt = names[int(m["prompt"][i])] if names else int(m["prompt"][i])
                writer.writerow([pair.reference, pair.candidate, prompt, *(int(a[i]) for a in at), token,
                                 vocab.get(str(token), ""), *(c[i].item() for c in columns)])  # fmt: skip
    return path


def render(run_dir: Path, view_positions: int = token_view.VIEW_POSITIONS) -> Path:
    """Every report file of a run folder from its record; returns the path of index.html, whose token view holds at
    most `view_positions` positions."""
    run_dir = Path(run_dir)
    record = records.read(run_dir)
    if record.status == "ok":
        summary = [{"reference": p.reference, "candidate": p.candidate, **p.aggregates} for p in record.pairs]
        _csv(run_dir / "summary.csv", summary, summary_columns(record))
        prompt_rows = [{"reference": p.reference, "candidate": p.candidate, **row} for p in record.pairs for row in p.prompts]
        # aggregate.PROMPT_AGGREGATES and the top-k overlaps, as the record holds them (an older record: fewer)
        per_prompt = dict.fromkeys(k for row in prompt_rows for k in row if k not in ("reference", "candidate"))
        _csv(run_dir / "prompts.csv", prompt_rows, ["reference", "candidate", *per_prompt])
        _csv(run_dir / "matrix.csv", record.matrix, MATRIX_COLUMNS)
        for name, (key, columns) in BIN_COLUMNS.items():
            if rows := [{"reference": p.reference, "candidate": p.candidate, **b} for p in record.pairs for b in p.aggregates.get(key, [])]:
                _csv(run_dir / name, rows, ["reference", "candidate", *columns])
        tokens = records.load_tokens(run_dir, record)
        write_positions_csv(run_dir, record, tokens)
        (run_dir / "kl_report.txt").write_text(llama_report.text(record), encoding="utf-8")
    index = run_dir / "index.html"
    index.write_text(html_report.render(run_dir, record, view_positions), encoding="utf-8")
    return index


def _ratio(x: float) -> str:
    """A PPL ratio in 9 characters: 4 decimals, or 4 significant digits past 9999 (a broken build's ratio of 1e7 kept
    the columns beside it in line)."""
    return f"{x:>9.4f}" if abs(x) < 1e4 or not math.isfinite(x) else f"{x:>9.3e}"


def table(record: records.RunRecord) -> str:
    floor = record.noise_floor
    head = (
        f"{'candidate':<22} {'positions':>9} {'kl_mean':>10} {'± se':>9} {'kl_p99':>9} {'js_mean':>9} "
        f"{'top1_agree':>10} {'ppl_ratio':>9}" + (f" {'x floor':>9}" if floor else "")
    )
    rows = []
    for p in record.pairs:
        a = p.aggregates
        row = (
            f"{p.candidate:<22} {a['positions']:>9} {a['kl_mean']:>10.3e} {html_report.summary_value(a, 'kl_mean_se'):>9.1e} {a['kl_p99']:>9.2e} "
            f"{a['js_mean']:>9.2e} {a['top1_agree']:>10.4f} {_ratio(a['ppl_ratio'])}"
        )
        rows.append(row + (f" {a['kl_floor_multiple']:>9.3g}" if floor else ""))
    notes = [
        f"{p.candidate}: another tokenizer (cross_vocab): {p.aggregates['positions']} of {p.aggregates['aligned_of']} "
        f"positions compared ({p.aggregates['aligned']} line up: both models start a token at the same byte; "
        f"{p.aggregates['positions']} of them predict a token both vocabularies hold), over {p.aggregates['shared_tokens']} shared tokens holding "
        f"{1 - p.aggregates['outside_mass_ref']:.2%} of the reference's mass and {1 - p.aggregates['outside_mass_cand']:.2%} of its own"
        + (f"; bits per byte on its own tokens {p.aggregates['bpb_cand']:.4f} against {p.aggregates['bpb_ref']:.4f} "
           f"(difference {p.aggregates['bpb_diff']:+.4f} ± {p.aggregates['bpb_diff_se']:.4f}, over {p.aggregates['bpb_bytes']} bytes)"
           if p.aggregates.get("bpb_bytes") else "")
        for p in record.pairs if "aligned_of" in p.aggregates
    ]  # fmt: skip
    if note := html_report.rounding_note(record):
        notes.append(f"note: {note}")
    return "\n".join([f"reference: {record.reference}", head, *rows, *notes])
