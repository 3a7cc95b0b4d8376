"""The data of the report page's token view (its script draws it): per position each pair's KL, both models' top 5
and their probabilities of the text's next token, the prompts' token texts, and each pair's per-prompt rows. Past
VIEW_POSITIONS positions it holds the first prompts' only, so that a long run's page stays small.
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np

from harness import records


def _round(a: np.ndarray, digits: int = 4) -> list:
    return [float(f"{x:.{digits}g}") if math.isfinite(x) else float(x) for x in np.asarray(a, dtype=np.float64).tolist()]


PROMPT_COLUMNS = ("positions", "kl_mean", "kl_mean_se", "kl_max", "js_mean", "top1_agree", "ppl_ratio", "delta_p_rms")


def _float(x) -> float:
    """A record value as a float for the view: None (NaN in strict JSON) and the strings "inf"/"-inf" included."""
    return math.nan if x is None else float(x)


VIEW_POSITIONS = 20_000  # the token view's positions at most (about 0.6 kB of page each, with 7 models): `harness report --view-positions`


def _view_rows(prompt: list[int], budget: int) -> tuple[list[int], set[int]] | None:
    """The rows of the first prompts (in prompt order) whose rows fit `budget` together (the first prompt's at least),
    and those prompts; None where every row fits."""
    if len(prompt) <= budget:
        return None
    counts = collections.Counter(p for p in prompt if p >= 0)
    shown, total = set(), 0
    for p in sorted(counts):
        if shown and total + counts[p] > budget:
            break
        shown.add(p)
        total += counts[p]
    return [i for i, p in enumerate(prompt) if p in shown], shown


def view_data(
    run_dir: Path, record: records.RunRecord, positions: dict[str, dict], tokens: dict | None, budget: int = VIEW_POSITIONS,
) -> dict:  # fmt: skip
    """What the per-prompt token view needs: per-position KL and flips, both models' top-5, token texts. Past `budget`
    positions, those of the first prompts that fit it (the page of a long run stays small); every prompt's row of
    the per-prompt table stays."""
    if not record.pairs or tokens is None:
        return {}
    # every pair over the reference's tokens has its positions, in its store's order; a cross_vocab pair has some of
    # them (ref_row: which); where every pair is cross_vocab, rows none of them aligns stay out (prompt -1)
    full = [m for m in positions.values() if "ref_row" not in m]
    # depth: the tokens before a position in its window (runs from 2026-12-07 on)
    keys = ("prompt", "position", "target") + (("depth",) if all("depth" in m for m in positions.values()) else ())
    if full:
        pos = {key: full[0][key].tolist() for key in keys}
    else:
        n = 1 + max(int(m["ref_row"].max()) for m in positions.values() if len(m["ref_row"]))
        pos = {key: [-1] * n for key in keys}
        for m in positions.values():
            for key in pos:
                for r, v in zip(m["ref_row"].tolist(), m[key].tolist()):
                    pos[key][r] = v
    # past the budget, the first prompts' rows only: chosen before any per-position value is rounded into the page
    cut = _view_rows(pos["prompt"], budget)
    rows = np.asarray(cut[0] if cut else range(len(pos["prompt"])), dtype=np.int64)
    kl = {}
    for c, m in positions.items():
        if "ref_row" in m:  # null where the pair has no aligned position
            spread = np.full(len(pos["prompt"]), np.nan)
            spread[m["ref_row"]] = m["kl"]
            kl[c] = [None if math.isnan(v) else v for v in _round(spread[rows])]
        else:
            kl[c] = _round(m["kl"][rows])
    # each model's probability of the text's next token (the reference's, the candidates' over the reference's tokens)
    p_target = {}
    for c, m in positions.items():
        if "ref_row" in m or not {"nll_ref", "nll_cand"} <= set(m):  # a cross_vocab pair's NLLs are over its own tokens
            continue
        if record.reference not in p_target:
            p_target[record.reference] = _round(np.exp(-m["nll_ref"][rows]), 4)
        p_target[c] = _round(np.exp(-m["nll_cand"][rows]), 4)
    index = {p["id"]: i for i, p in enumerate(tokens["prompts"])}
    data = {
        "reference": record.reference,
        "pos": pos,
        "kl": kl,
        "prompts": [{"id": p["id"], "texts": p["texts"]} for p in tokens["prompts"]],
        # each pair's per-prompt aggregates (prompts.csv) for the view's table: [prompt index, *PROMPT_COLUMNS]
        "prompt_rows": {p.candidate: [[index.get(r["prompt"], -1), *_round([_float(r.get(k)) for k in PROMPT_COLUMNS], 7)]
                                      for r in p.prompts] for p in record.pairs},  # fmt: skip
        "vocab": tokens["vocab"],
        "top": {},
        "p_target": p_target,
    }
    arrays = {}
    if name := record.files.get("top_tokens"):
        what = "each model's top tokens"
        arrays = records.load_npz(run_dir / name, what)
        for key, a in arrays.items():
            model, _, part = key.rpartition(".")
            other = f"{model}.{'probs' if part == 'ids' else 'ids'}"
            # a row per reference row: where every pair is cross_vocab, the view's rows stop at the last aligned one
            if part not in ("ids", "probs") or other not in arrays or a.ndim != 2 or a.shape[1] != 5 or len(a) < len(pos["prompt"]):
                raise records.RecordError(
                    f"{run_dir / name}: {what} that run.json names hold {key!r} {tuple(a.shape)}, where each model has "
                    f"'<model>.ids' and '<model>.probs' of shape ({len(pos['prompt'])}, 5); the run folder is damaged: "
                    "run `harness compare` again")  # fmt: skip
    if cut:
        shown = cut[1]
        data["view"] = {"prompts": len(shown), "of_prompts": len(set(pos["prompt"]) - {-1}), "positions": len(rows),
                        "of_positions": len(pos["prompt"]), "budget": budget}  # fmt: skip
        data["pos"] = {key: [v[i] for i in cut[0]] for key, v in pos.items()}
        data["prompts"] = [p if i in shown else {"id": p["id"], "texts": []} for i, p in enumerate(data["prompts"])]
    for key, a in arrays.items():
        a = a[rows] if cut else a  # uncut: every reference row (more than the view's where every pair is cross_vocab)
        model, _, part = key.rpartition(".")
        data["top"].setdefault(model, {})[part] = a.reshape(-1).tolist() if part == "ids" else _round(a.reshape(-1), 4)
    return data
