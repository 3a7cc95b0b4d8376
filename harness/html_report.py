"""index.html of a run: one self-contained file (no network, everything inlined) rendered from the record.

    harness report reports/latest && chromium reports/latest/index.html

The statistics' tables, SVG charts and heatmaps are built here in Python (the gate, throughput and run sections in
html_run, the number formats in html_format); the per-prompt token view is drawn by assets/report.js from a JSON
block. Every text that comes from a prompt, a token or the config is escaped (html_format.esc here, textContent in
the script), and the page's Content-Security-Policy forbids every fetch, so a prompt holding `<script>` shows as text
and nothing leaves the machine.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np

from harness import aggregate, charts, records
from harness.charts import PALETTE, cdf_svg, decades, depth_svg, heat, hist_svg
from harness.html_format import esc, fraction, num, script_json, sig
from harness.html_run import gate_section, metadata_section, throughput_section
from harness.llama_report import LLAMA_ROWS
from harness.token_view import VIEW_POSITIONS, view_data

CSP = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:"


SUMMARY_HEAD = [  # (aggregate key, header, format)
    ("positions", "positions", "d"), ("kl_mean", "KL mean", ".3e"), ("kl_mean_se", "KL ± se", ".1e"),
    ("kl_median", "KL median", ".2e"), ("kl_p99", "KL p99", ".2e"), ("kl_max", "KL max", ".2e"),
    ("kl_rev_mean", "rev. KL", ".2e"), ("js_mean", "JS", ".2e"), ("tv_mean", "TV", ".2e"),
    ("top1_agree", "top-1 agree", 4), ("top1_agree_se", "top-1 ± se", ".4f"), ("top5_overlap", "top-5 overlap", 4),
    ("delta_p_rms", "Δp RMS", ".2e"), ("ppl_ref", "PPL ref", ".3f"), ("ppl_cand", "PPL cand", ".3f"),
    ("ppl_ratio", "PPL ratio", ".5f"),
]  # fmt: skip
SUMMARY_TITLES = {  # each header's tooltip
    "positions": "scored positions compared", "kl_mean": "mean KL(reference ‖ candidate) per position, nats",
    "kl_mean_se": "standard error of the mean KL", "kl_median": "median KL", "kl_p99": "99th percentile of KL",
    "kl_max": "largest KL of one position", "kl_rev_mean": "mean KL(candidate ‖ reference), nats",
    "js_mean": "mean Jensen-Shannon divergence, nats", "tv_mean": "mean total variation distance",
    "top1_agree": "fraction of positions where both models' most likely token is the same",
    "top1_agree_se": "standard error of the top-1 agreement", "top5_overlap": "mean share of the reference's top 5 in the candidate's top 5",
    "delta_p_rms": "RMS of the change in the probability of the text's next token", "ppl_ref": "the reference's perplexity on the text",
    "ppl_cand": "the candidate's perplexity on the text", "ppl_ratio": "PPL cand over PPL ref",
    "kl_floor_multiple": "mean KL over the noise-floor pair's mean KL",
}  # fmt: skip


def summary_value(a: dict, key: str):
    """A pair's aggregate as the summary shows it: a standard error over prompts where the record has a finite one (a
    record from before 2026-12-07 has the per-position one only)."""
    v = a.get(f"{key}_prompts") if key.endswith("_se") else None
    return v if isinstance(v, (int, float)) and math.isfinite(v) else a.get(key)


def over_prompts(record: records.RunRecord) -> bool:
    """Whether the summary's ± are over prompts (summary_value): in a record of 2026-12-07 or later, of 2 prompts or
    more (from one, they are the per-position ones)."""
    return any(isinstance(v := p.aggregates.get("kl_mean_se_prompts"), (int, float)) and math.isfinite(v) and len(p.prompts) > 1
               for p in record.pairs)  # fmt: skip


def summary_table(record: records.RunRecord) -> str:
    head = SUMMARY_HEAD + ([("kl_floor_multiple", "× floor", ".3g")] if record.noise_floor else [])
    rows = ['<div class=wide><table class="sortable" id="summary"><thead><tr><th data-type="text">candidate</th>']
    over = over_prompts(record)
    titles = {k: t + (", over prompts" if over and k.endswith("_se") else "") for k, t in SUMMARY_TITLES.items()}
    rows += [f"<th title=\"{esc(titles.get(k, ''))}\">{esc(h)}</th>" for k, h, _ in head]
    rows.append("</tr></thead><tbody>")
    for p in record.pairs:
        floor = p.candidate == record.noise_floor
        badge = " <span class=badge>noise floor</span>" if floor else ""
        badge += " <span class=badge>cross-vocabulary</span>" if "aligned_of" in p.aggregates else ""
        cells = [f'<td data-v="{esc(p.candidate)}">{esc(p.candidate)}{badge}</td>']
        for key, _, spec in head:
            v = summary_value(p.aggregates, key)
            raw = "" if v is None or (isinstance(v, float) and math.isnan(v)) else repr(float(v))
            cells.append(f'<td data-v="{raw}">{fraction(v, spec) if isinstance(spec, int) else num(v, spec)}</td>')
        rows.append(f'<tr class="{"floor" if floor else ""}">{"".join(cells)}</tr>')
    rows.append("</tbody></table></div>")
    floor = "; × floor: mean KL over the noise-floor pair's" if record.noise_floor else ""
    over = (" over prompts (the positions of one prompt are not independent; from fewer than "
            f"{aggregate.MIN_PROMPTS} prompts, the larger of that and the per-position one); llama.cpp's, "
            "<a href=\"#llama\">in its terms</a> below, are per position" if over else "")
    rows.append(f"<p class=small>KL, rev. KL (candidate ‖ reference) and JS in nats; TV, agreements, overlaps and Δp RMS as "
                f"fractions; ± se: standard errors{over}{floor}. <span class=js>Click a column (or Enter on it) to sort.</span></p>")
    if note := rounding_note(record):
        rows.append(f"<p class=small id=rounding>Note: {esc(note)}</p>")
    return "".join(rows) + cross_vocab_note(record)


ROUNDING_SHARE = 0.05  # the share of a pair's mean KL from which the store's rounding is named


def rounding_note(record: records.RunRecord) -> str | None:
    """Plain text: the pairs whose mean KL the reference store's rounding (compare.store_rounding_kl, recorded with
    the reference's facts) makes up ROUNDING_SHARE or more of, or None."""
    added = record.variants.get(record.reference or "", {}).get("store_rounding_kl")
    if not added:
        return None
    hit = [(p.candidate, added / kl) for p in record.pairs if 0 < (kl := p.aggregates.get("kl_mean", math.nan)) < math.inf
           and added / kl >= ROUNDING_SHARE]  # fmt: skip
    if not hit:
        return None
    dtype = record.config.get("store_dtype", "16-bit")
    shares = ", ".join(f"{share:.0%} of {name}'s" for name, share in hit)
    return (f"the reference's {dtype} store rounds each log-prob, which adds about {added:.2e} nats to the mean KL of a "
            f"close pair (estimated from its rows): {shares}. store_dtype: float32 keeps them as computed (twice the disk).")


def cross_vocab_note(record: records.RunRecord) -> str:
    """What a cross_vocab pair's numbers are over: the aligned positions and the shared tokens (align.py)."""
    items = []
    for p in record.pairs:
        a = p.aggregates
        if "aligned_of" in a:
            items.append(
                f"<li><b>{esc(p.candidate)}</b> has another tokenizer. Of the reference's {a['aligned_of']} positions, "
                f"{a['aligned']} line up (both models start a token at the same byte, having read the same text), and "
                f"{a['positions']} of those predict a token both vocabularies hold: its numbers are over those. Both "
                f"distributions are taken over the {a['shared_tokens']} shared tokens, renormalised; on average these "
                f"hold {1 - a['outside_mass_ref']:.2%} of the reference's probability and {1 - a['outside_mass_cand']:.2%} "
                "of the candidate's. "
                + (f"Each model's likelihood of the text on its own tokens, over the {a['bpb_bytes']} bytes of the "
                   f"{a['bpb_spans']} spans between shared splits: <b>{a['bpb_cand']:.4f}</b> bits per byte against "
                   f"the reference's {a['bpb_ref']:.4f} (difference {a['bpb_diff']:+.4f} ± {a['bpb_diff_se']:.4f}): "
                   "comparable across tokenizers, where PPL over tokens is not. " if a.get("bpb_bytes") else "")
                + "Its top tokens are not shown in the token view.</li>"
            )
    return f"<p>Cross-vocabulary pairs (<code>cross_vocab: true</code>):</p><ul>{''.join(items)}</ul>" if items else ""


def _bins_table(bins: list[dict]) -> str:
    rows = ["<table class=bins><tr><th>reference p(top)</th><th>positions</th><th>KL mean</th><th>flip rate</th></tr>"]
    for b in bins:
        rows.append(
            f"<tr><td>{b['p_top_lo']:g}–{b['p_top_hi']:g}</td><td>{b['positions']}</td>"
            f"<td style=\"background:{heat(b['kl_mean'], 'kl')}\">{num(b['kl_mean'], '.2e')}</td>"
            f"<td style=\"background:{heat(1 - b['flip_rate'] if b['positions'] else None, 'top1')}\">{fraction(b['flip_rate'], 3)}</td></tr>"
        )
    return "".join(rows) + "</table>"


def _depth_table(bins: list[dict]) -> str:
    rows = ["<table class=bins><tr><th title=\"the tokens the model had before the position, in its window\">context depth</th>"
            "<th>positions</th><th title=\"the windows (forward passes) they come from\">windows</th><th>KL mean ± se</th>"
            "<th>flip rate</th><th title=\"mean NLL difference, candidate − reference\">ln PPL ratio ± se</th></tr>"]  # fmt: skip
    for b in bins:
        kl_se, ppl_se = (f" ± {num(b[k], '.1e')}" if b.get(k) is not None and math.isfinite(b[k]) else "" for k in ("kl_mean_se", "ln_ppl_ratio_se"))
        rows.append(
            f"<tr><td>{charts.depth_span(b)}</td><td>{b['positions']}</td><td>{b.get('windows', '–')}</td>"
            f"<td style=\"background:{heat(b['kl_mean'], 'kl')}\">{num(b['kl_mean'], '.2e')}{kl_se}</td>"
            f"<td style=\"background:{heat(1 - b['flip_rate'] if b['positions'] else None, 'top1')}\">{fraction(b['flip_rate'], 3)}</td>"
            f"<td>{num(b['ln_ppl_ratio'], '+.2e')}{ppl_se}</td></tr>"
        )
    return "".join(rows) + "</table>"


def _depth_note(record: records.RunRecord) -> str:
    """What the depth bins can and cannot show in this run's mode."""
    out = [f"Each ± is a standard error over windows (the positions of one window are not independent); a hollow point is "
           f"a bin from fewer than {MIN_WINDOWS} windows, a bin from one window has no ±."]  # fmt: skip
    config = record.config
    if config.get("mode") == "generate":
        out.append("In generate mode a position's depth is its prompt's length plus the continuation before it: the bins "
                   "also sort the prompts by length, so a difference between bins may be one between prompts.")  # fmt: skip
    cross = any(record.variants.get(p.candidate, {}).get("cross_vocab") for p in record.pairs)
    if config.get("mode") != "generate" and (config.get("text") or {}).get("score") == "second_half":
        context = config["text"]["context"]  # later windows score from depth context - context // 2 on
        out.append(f"With second_half scoring, depths under {'about ' if cross else ''}{context - context // 2} come from "
                   "each text's first window only: its opening tokens.")  # fmt: skip
    if cross:
        out.append("Depth counts the reference's tokens.")
    return f"<p class=small>{' '.join(out)}</p>"


MIN_WINDOWS = 5  # a depth bin from fewer windows is drawn hollow: its standard error rests on too few of them
MIN_CI_PROMPTS = 5  # below it the page gives no bootstrap interval over prompts (with 2, its ends were the 2 prompts' means)


def distribution_section(record: records.RunRecord, kl: dict[str, np.ndarray]) -> str:
    out = ["<h2 id=dist>KL distribution</h2>", f'<div class="wide">{cdf_svg(kl)}</div>']
    depth = {p.candidate: p.aggregates["by_depth"] for p in record.pairs if p.aggregates.get("by_depth")}
    if depth and max(len(bins) for bins in depth.values()) > 1:  # one bin (llama_cpp windows) draws no line
        out.append(f'<h3 id=depth>Mean KL by context depth</h3><div class="wide">{depth_svg(depth, MIN_WINDOWS)}</div>{_depth_note(record)}')
    out.append('<div class="cards">')
    span = decades(list(kl.values()))  # one axis for all: a histogram further right is a pair further off
    for i, p in enumerate(record.pairs):
        a = p.aggregates
        pct = " · ".join(f"p{q}: {num(a.get('kl_p' + q.replace('.', '_')), '.2e')}" for q in ("99.9", "99", "90", "10"))
        ci, n = a.get("kl_mean_ci95") or [None, None], len(p.prompts)
        ci = (f"95% CI over {n} prompts {num(ci[0], '.2e')}–{num(ci[1], '.2e')}" if n >= MIN_CI_PROMPTS else
              f"no CI: resampling {n} prompt{'' if n == 1 else 's'} says little")  # fmt: skip
        out.append(
            f'<div class="card"><h3>{esc(p.candidate)}</h3>{hist_svg(kl[p.candidate], PALETTE[i % len(PALETTE)], span=span)}'
            f"<p class=small>mean {num(a['kl_mean'], '.3e')} ({ci}) · {pct}</p>"
            f"<h4>by reference confidence</h4>{_bins_table(a.get('by_confidence', []))}"
            + (f"<h4>by context depth</h4><div class=wide>{_depth_table(a['by_depth'])}</div>" if a.get("by_depth") else "") + "</div>"
        )
    return "".join(out) + "</div>"


def _llama_cell(a: dict, row: tuple) -> str:
    """A row's value for the page (see _sig: 4 significant digits, more where its se or its distance from 100% needs
    them), its unit; "–" where the pair has none."""
    _, key, _, se_fmt, scale, unit = row
    v, se = a.get(key), a.get(f"{key}_se")
    if v is None:
        return "–"
    se = float(se) * scale if se_fmt is not None and se is not None else None
    return esc(sig(float(v) * scale, se, near=100.0 if unit.strip() == "%" and se is None else None) + unit)


def llama_section(record: records.RunRecord) -> str:
    """Each pair's numbers in the rows and units of llama.cpp's KL report (Δp and same top p in %), to read beside one."""
    out = [
        "<h2 id=llama>In llama.cpp's terms</h2><p>The statistics of <code>llama-perplexity --kl-divergence</code>, in its "
        "rows and units (Δp and same top p in %, ± a standard error), over the scored positions of this run, to 4 "
        "significant digits or to the standard error's second, whichever is finer (<code>kl_report.txt</code> has them in its own fixed-point formats). Q: the candidate; "
        "base: the reference.</p>"
        "<div class=wide><table id=llama-table><thead><tr><th>statistic</th>",
        *(f"<th>{esc(p.candidate)}</th>" for p in record.pairs),
        "</tr></thead>",
    ]
    for i, row in enumerate(LLAMA_ROWS):  # each group of rows a <tbody> under its heading (LLAMA_ROWS opens with one)
        label = " ".join(row[0].strip("= ").split())
        if row[1] is None:
            out.append(("</tbody>" if i else "") + f'<tbody><tr><th colspan="{1 + len(record.pairs)}" scope=rowgroup class=group>{esc(label)}</th></tr>')
            continue
        cells = (_llama_cell(p.aggregates, row) for p in record.pairs)
        out.append(f"<tr><td>{esc(label)}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "".join(out) + "</tbody></table></div>"


def matrix_section(record: records.RunRecord) -> str:
    if not record.matrix:
        return "<h2 id=matrix>All pairs</h2><p>Not computed (metrics.matrix: false).</p>"
    models = list(dict.fromkeys([r["a"] for r in record.matrix] + [r["b"] for r in record.matrix]))
    cell = {(r["a"], r["b"]): r for r in record.matrix} | {(r["b"], r["a"]): r for r in record.matrix}
    out = ["<h2 id=matrix>All pairs</h2><div class=cards>"]
    for key, title, kind, spec in (("top1_agree", "top-1 agreement", "top1", 3), ("sym_kl_mean", "symmetric KL (nats)", "kl", ".2e")):
        rows = [f"<div class=card><h3>{title}</h3><div class=wide><table class=heat id=heat-{kind}><tr><th><span class=sr>model</span></th>"]
        rows += [f"<th class=rot><span>{esc(m)}</span></th>" for m in models]
        rows.append("</tr>")
        for a in models:
            rows.append(f"<tr><th>{esc(a)}</th>")
            for b in models:
                if a == b:
                    rows.append('<td class=self title="the same model">–</td>')
                    continue
                v = cell.get((a, b), {}).get(key)
                rows.append(f'<td style="background:{heat(v, kind)}" title="{esc(a)} vs {esc(b)}">{fraction(v, spec) if isinstance(spec, int) else num(v, spec)}</td>')
            rows.append("</tr>")
        out.append("".join(rows) + "</table></div></div>")
    legend = "".join(f'<span style="background:{heat(v, "top1")}">{v:g}</span>' for v in (0.999, 0.99, 0.95, 0.8, 0.5))
    legend += " · " + "".join(f'<span style="background:{heat(v, "kl")}">{v:.0e}</span>' for v in (1e-7, 1e-5, 1e-3, 1e-1, 10))
    return "".join(out) + f"</div><p class='legend small'>colours: top-1 agreement {legend} nats</p>"


def warp_section(record: records.RunRecord, n_vocab: int | None) -> str:
    out = [
        "<h2 id=inf>Why are generate()'s scores mostly −inf?</h2>",
        "<p>Qwen1.5-Chat models ship a sampling <code>generation_config</code> (top-k, top-p, temperature, "
        "repetition penalty). <code>generate(output_scores=True)</code> returns the scores <em>after</em> those "
        "warpers, so every token they cut is −inf; <code>output_logits=True</code> (or a plain forward pass, as "
        "this harness uses) gives the raw row, in which every entry is finite. Per scored position of this run:</p>",
        "<div class=wide><table id=warp><tr><th>model</th><th>warpers</th><th>raw row: entries, all finite</th>"
        "<th>finite after warpers: median (p10–p90, min–max)</th><th>steps with one finite</th>"
        "<th>raw mass kept: mean (median)</th><th>max raw mass on the padding columns</th></tr>",
    ]
    first = None
    for name, v in record.variants.items():
        w, cfg = v.get("warp"), v.get("warpers") or {}
        if not w:
            continue
        knobs = ", ".join(f"{k}={cfg[k]}" for k in ("do_sample", "top_k", "top_p", "temperature", "repetition_penalty") if cfg.get(k) is not None)
        first = first or (name, w)
        out.append(
            f"<tr><td>{esc(name)}</td><td class=text>{esc(knobs or 'none')}</td><td>{esc(v.get('logit_width', '–'))}</td>"
            f"<td>{num(w['finite_p50'], '.0f')} ({num(w['finite_p10'], '.0f')}–{num(w['finite_p90'], '.0f')}, "
            f"{num(w['finite_min'], '.0f')}–{num(w['finite_max'], '.0f')})</td><td>{num(100 * w['single_finite_rate'], '.1f')}%</td>"
            f"<td>{num(w['kept_mass_mean'], '.3f')} ({num(w['kept_mass_p50'], '.3f')})</td>"
            f"<td>{num(w['pad_mass_max'], '.1e')}</td></tr>"
        )
    out.append("</table></div>")
    if first and (width := record.variants[first[0]].get("logit_width")):
        name, w = first
        out.append(
            f"<p>So for <b>{esc(name)}</b>, of the {width} entries of a step's score row a median of "
            f"{num(w['finite_p50'], '.0f')} are finite and the other {num(width - w['finite_p50'], '.0f')} are −inf; "
            f"those finite tokens held {num(100 * w['kept_mass_mean'], '.1f')}% of the raw probability on average. "
            f"Only the first {esc(n_vocab or '–')} columns are real tokens: the rest of the row is padding, cut before "
            "every statistic in this report.</p>"
        )
    return "".join(out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def scope(record: records.RunRecord) -> str:
    """What a run compared and on what: the reference, the candidates, the prompts and positions, how they were scored;
    and the prompts that gave no scored position (a prompt shorter than a llama_cpp window, say), by name."""
    cfg, n = record.config, record.pairs[0].aggregates["positions"] if record.pairs else 0
    if cfg.get("mode") == "generate":
        how = f"mode generate: each prompt's greedy continuation by the reference, up to {esc((cfg.get('generate') or {}).get('max_new_tokens'))} tokens"
    else:
        text = cfg.get("text") or {}
        how = f"mode text: windows of {esc(text.get('context'))} tokens, text.score {esc(text.get('score'))}"
    out = (f"Reference <b>{esc(record.reference)}</b>, {_plural(len(record.pairs), 'candidate')}, {_plural(n, 'scored position')}"
           f" ({how}).")  # fmt: skip
    scored = {r.get("prompt") for p in record.pairs[:1] for r in p.prompts}
    prompts = record.inputs.get("prompts")
    if record.pairs and isinstance(prompts, int) and len(scored) < prompts:
        out += (f" <b>{prompts - len(scored)} of the {prompts} prompts have no scored position</b> and are in no statistic"
                + (": shorter than one window, which llama_cpp scoring drops whole" if (cfg.get("text") or {}).get("score") == "llama_cpp"
                   and cfg.get("mode") != "generate" else "") + ".")  # fmt: skip
    return out


def render(run_dir: Path, record: records.RunRecord, view_positions: int = VIEW_POSITIONS) -> str:
    run_dir = Path(run_dir)
    css = resources.files("harness").joinpath("assets/report.css").read_text()
    js = resources.files("harness").joinpath("assets/report.js").read_text()
    positions = {p.candidate: records.load_positions(run_dir, p) for p in record.pairs}
    kl = {c: m["kl"] for c, m in positions.items()}
    tokens = records.load_tokens(run_dir, record) if record.status == "ok" else None  # a failed run's: not needed
    n_vocab = (record.variants.get(record.reference or "", {}) or {}).get("n_vocab") or (tokens or {}).get("n_vocab")
    title = f"Drift report {record.run_id}"
    body = [f"<h1>{esc(title)}</h1>"]
    if record.status != "ok":
        body.append(f'<div class="error"><b>This run failed.</b> {esc(record.error)}<br>The stores of the models it finished '
                    "are kept: the same command again reuses them and goes on where it stopped.</div>")
    else:
        gate = gate_section(run_dir)
        body += [
            f"<p>{scope(record)} Noise floor: <b>{esc(record.noise_floor or 'none set')}</b>.</p>",
            '<nav><a href="#summary">summary</a> ' + ('<a href="#gate">gate</a> ' if gate else "") + '<a href="#dist">KL distribution</a> '
            '<a href="#llama">llama.cpp terms</a> <a href="#matrix">all pairs</a> '
            '<a href="#tokens">per prompt</a> <a href="#inf">−inf scores</a> <a href="#meta">run</a></nav>',
            "<h2>Summary</h2>", summary_table(record), gate, distribution_section(record, kl), llama_section(record), matrix_section(record),
            "<h2 id=tokens>Per prompt</h2><div id=view><p>Needs the script to run.</p></div>",
            warp_section(record, n_vocab), throughput_section(record),
        ]  # fmt: skip
    body.append(metadata_section(record))
    data = view_data(run_dir, record, positions, tokens, view_positions) if record.status == "ok" else {}
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
        f"<style>{css}</style></head><body><main>{''.join(body)}</main>"
        f'<script type="application/json" id="data">{script_json(data)}</script><script>{js}</script></body></html>\n'
    )
