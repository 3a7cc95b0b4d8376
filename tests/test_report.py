"""Reports of a real run (the micro zoo, `micro_run`): CSV columns, re-rendering from the record alone,
and index.html loaded in Debian's headless chromium (no console error, no request, payloads inert)."""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import shutil

import numpy as np
import pytest
from conftest import axe_violations, open_page

from harness import aggregate, html_format, html_report, html_run, llama_report, records, report, token_view
from harness.cli import main

pytestmark = pytest.mark.slow
REQUIRED_SUMMARY = (
    "reference,candidate,positions,kl_mean,kl_mean_se,kl_median,kl_p99,kl_max,kl_rev_mean,js_mean,tv_mean,"
    "top1_agree,top1_agree_se,top5_overlap,top10_overlap,delta_p_rms,ppl_ref,ppl_cand,ppl_ratio,kl_floor_multiple,"
    "kl_mean_se_prompts,top1_agree_se_prompts,ln_ppl_ratio_se_prompts"
).split(",")
CANDIDATES = {"s-chat-fp16", "s-chat-bf16", "s-chat-gptq-int8", "s-chat-gptq-int4", "s-base", "m-chat"}


def test_summary_csv_has_every_column_and_matches_the_record(micro_run):
    run_dir, _ = micro_run
    with (run_dir / "summary.csv").open() as f:
        reader = csv.DictReader(f)
        assert set(REQUIRED_SUMMARY) <= set(reader.fieldnames)
        rows = {r["candidate"]: r for r in reader}
    assert set(rows) == CANDIDATES
    rec = records.read(run_dir)
    for p in rec.pairs:
        for key in ("kl_mean", "kl_p99", "top1_agree", "ppl_ratio", "kl_floor_multiple", "kl_mean_se_prompts", "ln_ppl_ratio_se_prompts"):
            assert float(rows[p.candidate][key]) == pytest.approx(p.aggregates[key], rel=1e-12)


def test_positions_csv_has_a_row_per_pair_and_position_with_the_token_text(micro_run):
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    tokens = json.loads((run_dir / "tokens.json").read_text())
    with gzip.open(run_dir / "positions.csv.gz", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    n = rec.pairs[0].aggregates["positions"]
    assert len(rows) == len(rec.pairs) * n
    assert list(rows[0])[:8] == ["reference", "candidate", "prompt", "position", "depth", "window", "token", "token_text"]
    assert {"kl", "kl_rev", "js", "tv", "top1_agree", "delta_p", "nll_ref", "nll_cand", "entropy_ref", "p_top_ref",
            "margin_ref"} <= set(rows[0])  # fmt: skip
    int4 = [r for r in rows if r["candidate"] == "s-chat-gptq-int4"]
    kl = np.load(run_dir / "positions-s-chat-gptq-int4.npz")["kl"]
    np.testing.assert_allclose([float(r["kl"]) for r in int4], kl, rtol=1e-12)
    names = {p["id"] for p in tokens["prompts"]}
    for r in int4[:50]:
        assert r["prompt"] in names and r["token_text"] == tokens["vocab"][r["token"]]
        seq = next(p for p in tokens["prompts"] if p["id"] == r["prompt"])
        assert seq["ids"][int(r["position"])] == int(r["token"])  # the scored token sits at that position


def test_prompt_and_matrix_csv(micro_run):
    run_dir, _ = micro_run
    prompts = list(csv.DictReader((run_dir / "prompts.csv").open()))
    assert len(prompts) == 6 * 10 and list(prompts[0]) == ["reference", "candidate", "prompt", *aggregate.PROMPT_AGGREGATES,
                                                           "top5_overlap", "top10_overlap"]  # fmt: skip
    matrix = list(csv.DictReader((run_dir / "matrix.csv").open()))
    assert len(matrix) == 7 * 6 // 2 and all(0 <= float(m["top1_agree"]) <= 1 and float(m["sym_kl_mean"]) >= 0 for m in matrix)


def test_the_depth_chart_puts_each_power_of_two_at_one_place():
    """Bins of one power of two cut to other bounds (a record's pairs from other spans) share one x position."""
    from harness import charts

    def b(lo, hi, kl):
        return {"depth_lo": lo, "depth_hi": hi, "positions": 9, "windows": 9, "kl_mean": kl, "kl_mean_se": kl / 10}

    svg = charts.depth_svg({"a": [b(1, 1, 1e-3), b(2, 3, 1e-3), b(4, 6, 1e-3)], "c": [b(2, 3, 1e-2), b(4, 7, 1e-2)]})
    labels = re.findall(r'text-anchor="middle">([0-9–]+)</text>', svg)
    assert labels == ["1", "2–3", "4–7"]
    points = re.findall(r'<circle cx="([0-9.]+)"[^>]*><title>([a-z]), depth ([0-9–]+)', svg)
    xs = {f"{name}{span}": float(x) for x, name, span in points}
    assert xs["a4–6"] == xs["c4–7"] and xs["a2–3"] == xs["c2–3"] and xs["a1"] < xs["a2–3"] < xs["a4–6"]


def test_a_depth_bin_of_a_record_from_before_windows_reads():
    """Records of 7d388cf (2026-12-07) have depth bins without windows and ln_ppl_ratio_se: they read."""
    from harness import record_shapes

    old = {"depth_lo": 1, "depth_hi": 1, "positions": 3, "kl_mean": 1e-3, "kl_mean_se": 1e-4, "flip_rate": 0.0, "ln_ppl_ratio": 1e-3}
    agg = {"positions": 3, "kl_mean": 1e-3, "top1_agree": 1.0, "by_depth": [old]}
    assert record_shapes.checked(record_shapes.Aggregates, agg) == agg
    assert "<td>–</td>" in html_report._depth_table([old])


def test_binned_csvs_hold_the_records_bins(micro_run):
    """confidence.csv and depth.csv: a row per (pair, bin), the record's values (NaN in an empty bin as an empty cell)."""
    run_dir, _ = micro_run
    record = records.read(run_dir)
    for name, key in (("confidence.csv", "by_confidence"), ("depth.csv", "by_depth")):
        rows = list(csv.DictReader((run_dir / name).open()))
        want = [(p.candidate, b) for p in record.pairs for b in p.aggregates[key]]
        assert len(rows) == len(want) > len(record.pairs)
        assert list(rows[0])[:2] == ["reference", "candidate"] and set(rows[0]) - {"reference", "candidate"} == set(want[0][1])
        for row, (candidate, b) in zip(rows, want, strict=True):
            assert row["candidate"] == candidate
            for k, v in b.items():
                assert float(row[k] or "nan") == pytest.approx(v, nan_ok=True, rel=1e-15), (name, k)
    depth = list(csv.DictReader((run_dir / "depth.csv").open()))
    assert depth[0]["depth_lo"] == "1" and depth[0]["depth_hi"] == "1" and depth[1]["depth_lo"] == "2" and depth[1]["depth_hi"] == "3"


# What llama-perplexity --kl-divergence prints at the end (tools/perplexity/perplexity.cpp; the numbers from the
# example in its README): every label and layout the harness's kl_report.txt must repeat.
LLAMA_CPP_OUTPUT = """\
====== Perplexity statistics ======
Mean PPL(Q)                   :  18.274923 ±   0.147295
Mean PPL(base)                :  19.087688 ±   0.155066
Cor(ln(PPL(Q)), ln(PPL(base))):  97.75%
Mean ln(PPL(Q)/PPL(base))     :  -0.043514 ±   0.001718
Mean PPL(Q)/PPL(base)         :   0.957419 ±   0.001645
Mean PPL(Q)-PPL(base)         :  -0.812765 ±   0.032991

====== KL divergence statistics ======
Mean    KLD:   0.171127 ±   0.000512
Maximum KLD:   8.847817
99.9%   KLD:   2.049528
99.0%   KLD:   0.881522
95.0%   KLD:   0.452161
90.0%   KLD:   0.338123
Median  KLD:   0.129044
10.0%   KLD:   0.015355
 5.0%   KLD:   0.005119
 1.0%   KLD:   0.000561
 0.1%   KLD:   0.000012
Minimum KLD:   0.000002

====== Token probability statistics ======
Mean    Δp:  0.473 ± 0.024 %
Maximum Δp: 96.932%
99.9%   Δp: 53.430%
99.0%   Δp: 30.014%
95.0%   Δp: 14.910%
90.0%   Δp:  9.043%
75.0%   Δp:  2.252%
Median  Δp:  0.003%
25.0%   Δp: -1.340%
10.0%   Δp: -7.318%
 5.0%   Δp: -12.953%
 1.0%   Δp: -27.743%
 0.1%   Δp: -55.209%
Minimum Δp: -97.016%
RMS Δp    :  9.178 ± 0.043 %
Same top p: 78.637 ± 0.107 %
"""


def _shape(line: str) -> str:
    """A line with its numbers blanked: its label, separators and units."""
    label, colon, rest = line.partition(": ")
    return label + colon + re.sub(r"\s*-?(\d+\.\d+|nan|inf)", "#", rest)


def test_noise_floor_multiples_and_a_floor_without_drift():
    from harness.compare import PairResult

    pairs = [PairResult("ref", c, {"kl_mean": kl}, [], {}) for c, kl in (("bf16", 2e-4), ("int4", 4e-3))]
    assert report.add_floor(pairs, "bf16") is None
    assert [p.aggregates["kl_floor_multiple"] for p in pairs] == pytest.approx([1.0, 20.0])
    pairs = [PairResult("ref", c, {"kl_mean": kl}, [], {}) for c, kl in (("fp32", 0.0), ("int4", 4e-3))]
    warning = report.add_floor(pairs, "fp32")
    assert "noise floor pair 'fp32' has mean KL 0.0" in warning
    assert all(np.isnan(p.aggregates["kl_floor_multiple"]) for p in pairs)  # not inf: no multiple of 0 means anything


def test_llama_number_keeps_four_digits_in_fixed_point():
    """printf's %10.6f where it shows 4 or more significant digits, more decimals (up to 24) where not."""
    assert llama_report.llama_number(18.274923456, 10, 6) == " 18.274923"  # as llama.cpp prints it
    assert llama_report.llama_number(0.171127, 10, 6) == "  0.171127"
    assert llama_report.llama_number(4.5312e-06, 10, 6) == "0.000004531"
    assert llama_report.llama_number(-2.0571e-3 * 100, 6, 3) == "-0.2057"
    assert llama_report.llama_number(-5.207e-12, 6, 3) == "-0.000000000005207"  # a float16 pair's median Δp, in %
    assert llama_report.llama_number(-2.98e-26, 6, 3) == "-0.000000000000000000000000"  # 24 decimals at most
    assert llama_report.llama_number(0.0, 10, 6) == "  0.000000"
    assert llama_report.llama_number(-0.0, 6, 3) == " 0.000"  # a model against itself: no "-0.000%"
    assert [llama_report.llama_number(x, 10, 6).strip() for x in (None, float("nan"), "inf", float("-inf"))] == ["nan", "nan", "inf", "-inf"]


def test_histogram_says_how_many_positions_are_exactly_0_and_each_bars_range():
    """KL = 0 (a model against itself, or a greedy-identical row) has no place on a log axis: those positions go to the
    first bar, and the chart says how many; each bar's tooltip gives its count and its KL range."""
    from harness import charts

    svg = charts.hist_svg(np.array([0.0, 0.0, 0.0, 2e-5, 3e-3]), "#000", span=(-6, -2))
    titles = re.findall(r"<title>([^<]*)</title>", svg)
    assert len(titles) == 16 and titles[0] == "3 positions, KL 1e-6 to 1.8e-6, 3 of them exactly 0"
    assert titles[5] == "1 position, KL 1.8e-5 to 3.2e-5" and "3 exactly 0 (in the first bar)" in svg
    assert "exactly 0" not in charts.hist_svg(np.array([2e-5, 3e-3]), "#000", span=(-6, -2))


def test_the_page_gives_no_interval_over_too_few_prompts(micro_run):
    """The bootstrap interval over prompts resamples prompts: over 2 its ends were the 2 prompts' own means."""
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    kl = {p.candidate: records.load_positions(run_dir, p)["kl"] for p in rec.pairs}
    assert re.search(r"95% CI over 10 prompts \d", html_report.distribution_section(rec, kl))
    few = rec.model_copy(update={"pairs": [p.model_copy(update={"prompts": p.prompts[:2]}) for p in rec.pairs]})
    text = html_report.distribution_section(few, kl)
    assert "95% CI" not in text and text.count("no CI: resampling 2 prompts says little") == len(rec.pairs)


def test_numbers_on_the_page_keep_their_digits():
    """The page's formats: at least 4 significant digits with trailing zeros kept, more to reach a standard error's
    second digit or a correlation's distance from 100%; an agreement that is not 1 never reads 1.000."""
    sig = html_format.sig
    assert sig(1.000044, 0.0001014) == "1.00004 ± 0.00010"  # a good quant's PPL ratio: not "1 ± 0.0001"
    assert sig(4216.619, 35.2) == "4217 ± 35" and sig(13260.4, 1998.0) == "13260 ± 2000"
    assert sig(14.002261) == "14.00" and sig(0.548) == "0.5480" and sig(-0.34) == "-0.3400"
    assert sig(1.891e-04, 6.4e-06) == "1.891e-4 ± 6.4e-6" and sig(0.002766, 0.000147) == "0.002766 ± 0.000147"
    assert sig(4.531e-06, 3.3e-07) == "4.531e-6 ± 3.3e-7" and sig(-5.2e-12) == "-5.200e-12" and sig(1e7) == "1.000e+7"
    assert sig(99.99981, near=100.0) == "99.99981" and sig(97.5, near=100.0) == "97.50"
    assert sig(0.0) == "0" and sig(float("inf")) == "∞" and sig(0.0, 0.02) == "0.000 ± 0.020"
    frac = html_format.fraction
    assert [frac(v, 3) for v in (0.99956, 0.9999996, 1.0, 0.0, 0.0004, 0.5)] == ["0.9996", "1.000000", "1.000", "0.000", "0.0004", "0.500"]
    assert frac(None, 3) == "–"


def test_the_view_data_keeps_the_digits_the_page_shows(micro_run):
    """The token view's per-prompt rows to 7 significant digits (its PPL ratio shows 4 decimals) and the top-5
    probabilities to 4 (shown to 4 significant digits)."""
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    positions = {p.candidate: records.load_positions(run_dir, p) for p in rec.pairs}
    data = token_view.view_data(run_dir, rec, positions, records.load_tokens(run_dir, rec))
    ratio = 1 + token_view.PROMPT_COLUMNS.index("ppl_ratio")
    names = [p["id"] for p in data["prompts"]]
    for r in csv.DictReader((run_dir / "prompts.csv").open()):
        row = next(x for x in data["prompt_rows"][r["candidate"]] if names[x[0]] == r["prompt"])
        assert row[ratio] == pytest.approx(float(r["ppl_ratio"]), rel=5e-7)
    with np.load(run_dir / rec.files["top_tokens"]) as z:
        for key in z.files:
            model, part = key.rsplit(".", 1)
            if part == "probs":
                np.testing.assert_allclose(data["top"][model]["probs"], z[key].reshape(-1), rtol=5e-4, atol=0)


def test_kl_report_txt_in_llama_cpp_terms(micro_run):
    """kl_report.txt: a block a pair, each llama.cpp's summary line for line (labels, spacing, units), the
    numbers as the record has them, in fixed point with at least 4 significant digits."""
    run_dir, _ = micro_run
    text = (run_dir / "kl_report.txt").read_text()
    pairs = {p.candidate: p.aggregates for p in records.read(run_dir).pairs}
    blocks = [b for b in text.split("###### ") if b]
    assert [b.split()[0] for b in blocks] == list(pairs)
    expected = [_shape(line) for line in LLAMA_CPP_OUTPUT.splitlines()]
    for block, a in zip(blocks, pairs.values(), strict=True):
        lines = block.splitlines()[1:]
        assert [_shape(line) for line in lines[: len(expected)]] == expected
        assert "e-" not in block and "e+" not in block  # fixed point, as llama.cpp's parsers expect
        values = {line.split(": ")[0].strip(): line.split(": ")[1] for line in lines if ": " in line}

        def number(label: str, at: int = 0) -> float:
            return float(re.findall(r"-?\d+\.\d+", values[label])[at])

        for label, key, scale in (("Mean    KLD", "kl_mean", 1), ("99.0%   KLD", "kl_p99", 1), ("Minimum KLD", "kl_min", 1),
                                  ("Mean PPL(Q)/PPL(base)", "ppl_ratio", 1), ("Minimum Δp", "delta_p_min", 100),
                                  ("Same top p", "top1_agree", 100), ("Cor(ln(PPL(Q)), ln(PPL(base)))", "nll_correlation", 100)):  # fmt: skip
            assert number(label) == pytest.approx(a[key] * scale, rel=5e-4, abs=5e-7 * scale), label
        assert number("Mean    KLD", 1) == pytest.approx(a["kl_mean_se"], rel=5e-4)
        assert number("Same top p", 1) == pytest.approx(100 * a["top1_agree_se"], rel=5e-4)
        # every order statistic line against numpy on the pair's per-position values (each label its own quantile)
        with np.load(run_dir / f"positions-{block.split()[0]}.npz") as z:
            series = {"KLD": z["kl"].astype(np.float64), "Δp": 100 * z["delta_p"].astype(np.float64)}
        checked = 0
        for label in values:
            m = re.fullmatch(r"(Maximum|Median|Minimum|[\d.]+%)\s+(KLD|Δp)", label)
            if m:
                x = series[m[2]]
                q = {"Maximum": 100.0, "Median": 50.0, "Minimum": 0.0}.get(m[1], None)
                q = float(m[1][:-1]) if q is None else q
                assert number(label) == pytest.approx(np.percentile(x, q), rel=5e-4, abs=5e-7 * (100 if m[2] == "Δp" else 1)), label
                checked += 1
        assert checked == 11 + 13  # KLD: max, 4 upper, median, 4 lower, min; Δp: max, 5 upper, median, 5 lower, min


def test_token_texts_join_to_the_decoded_prompt(micro_run, tokenizer):
    run_dir, _ = micro_run
    for p in json.loads((run_dir / "tokens.json").read_text())["prompts"]:
        assert "".join(p["texts"]) == tokenizer.decode(p["ids"])


def test_report_re_renders_from_the_record_alone(micro_run, tmp_path, monkeypatch):
    run_dir, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    for name in ("summary.csv", "prompts.csv", "matrix.csv", "confidence.csv", "depth.csv", "positions.csv.gz", "kl_report.txt", "index.html"):
        (copy / name).unlink()

    def no_models(*args, **kwargs):
        raise AssertionError("harness report loaded a model")

    monkeypatch.setattr("harness.loaders.load_model", no_models)
    monkeypatch.setattr("harness.loaders.load_tokenizer", no_models)
    assert main(["report", str(copy)]) == 0
    for name in ("summary.csv", "prompts.csv", "matrix.csv", "confidence.csv", "depth.csv", "kl_report.txt", "index.html"):
        assert (copy / name).read_bytes() == (run_dir / name).read_bytes(), name
    (copy / "index.html").unlink()
    assert main(["report", str(copy / "run.json")]) == 0  # the record's file names its folder too
    assert (copy / "index.html").read_bytes() == (run_dir / "index.html").read_bytes()


def test_damaged_side_files_are_errors_naming_them(micro_run, tmp_path):
    """`harness report` on a run folder whose tokens.json or top_tokens.npz is missing, cut short or foreign: an error
    naming the file (exit 2), not a traceback."""
    run_dir, _ = micro_run
    for name, content, message in (("top_tokens.npz", None, r"top_tokens\.npz: each model's top tokens that run\.json names"),
                                   ("top_tokens.npz", b"garbage", r"top_tokens\.npz: .* incomplete or damaged"),
                                   ("tokens.json", b"{", r"tokens\.json: the prompts' tokens that run\.json names"),
                                   ("tokens.json", b"[]", r"tokens\.json: .*not an object with 'prompts' and 'vocab'")):  # fmt: skip
        copy = tmp_path / f"{name}-{content}"
        shutil.copytree(run_dir, copy)
        (copy / name).unlink()
        if content is not None:
            (copy / name).write_bytes(content)
        with pytest.raises(records.RecordError, match=message):
            report.render(copy)
        assert main(["report", str(copy)]) == 2


def test_side_files_holding_the_wrong_arrays_are_errors_naming_them(micro_run, tmp_path):
    """Side files that open but hold the wrong arrays (edited, or from another run): a positions file without `kl` or
    cut short, top_tokens.npz without one model's probabilities, tokens.json short of a prompt. Each is an error
    naming the file (exit 2); they ended `harness report` with a traceback (exit 3) or a page whose view failed."""
    import numpy as np

    run_dir, _ = micro_run
    rec = records.read(run_dir)
    positions = rec.pairs[0].positions_file

    def npz(copy, name, change):
        with np.load(run_dir / name) as z:
            arrays = {k: z[k] for k in z.files}
        change(arrays)
        np.savez(copy / name, **arrays)

    def tokens(copy):
        t = json.loads((run_dir / "tokens.json").read_text())
        (copy / "tokens.json").write_text(json.dumps(t | {"prompts": t["prompts"][:-1]}))

    cases = {
        "no-kl": (lambda copy: npz(copy, positions, lambda a: a.pop("kl")), r"positions-.*it lacks the array\(s\) kl"),
        "short": (lambda copy: npz(copy, positions, lambda a: a.update(js=a["js"][:-1])), r"the pair has \d+ positions, but .* js \(\d+,\)"),
        "top": (lambda copy: npz(copy, "top_tokens.npz", lambda a: a.pop(f"{rec.reference}.probs")), r"top_tokens\.npz: .*'<model>\.probs'"),
        "tokens": (tokens, r"tokens\.json: .*it holds \d+ prompts, the run had \d+"),
    }
    for name, (damage, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(run_dir, copy)
        damage(copy)
        with pytest.raises(records.RecordError, match=message):
            report.render(copy)
        assert main(["report", str(copy)]) == 2, name


def test_a_schema_1_record_still_renders(micro_run, tmp_path):
    run_dir, _ = micro_run
    copy = tmp_path / "old"
    shutil.copytree(run_dir, copy)
    raw = json.loads((copy / "run.json").read_text())
    keep = {"status", "created_at", "config", "variants", "noise_floor", "pairs", "matrix"}
    old = {k: v for k, v in raw.items() if k in keep} | {"schema_version": 1, "machine": {"platform": "x", "cpus": 2}}
    (copy / "run.json").write_text(json.dumps(old))
    index = report.render(copy)
    assert "Summary" in index.read_text() and records.read(copy).schema_version == records.SCHEMA_VERSION


def test_script_json_cannot_close_its_element():
    payload = {"t": "</script><script>alert(1)</script>", "u": "a\u2028b & <!--", "inf": float("inf"), "nan": float("nan")}
    text = html_format.script_json(payload)
    assert "<" not in text and ">" not in text and "&" not in text
    back = json.loads(text)
    assert back == {"t": payload["t"], "u": payload["u"], "inf": "inf", "nan": None}


# ---------------------------------------------------------------- in a real browser


def test_index_html_opens_offline_with_no_errors(browser, micro_run):
    run_dir, _ = micro_run
    index = run_dir / "index.html"
    page, seen = open_page(browser, index)
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] in ("error", "warning")] == []
    assert seen["requests"] == [index.as_uri()]  # nothing but the file itself: no CDN, no font, no image
    ids = page.evaluate("[...document.querySelectorAll('[id]')].map(e => e.id)")
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)  # each anchor names one element
    assert page.locator("#summary tbody tr").count() == len(CANDIDATES)
    assert page.locator("#summary tr.floor").inner_text().startswith("s-chat-bf16")
    # its ± columns: the standard errors over prompts (each cell's data-v holds the value), not llama.cpp's per position
    heads = page.locator("#summary th").all_inner_texts()
    shown = {row[0].split()[0]: row for row in page.evaluate(
        "[...document.querySelectorAll('#summary tbody tr')].map(r => [...r.cells].map(c => c.dataset.v))")}  # fmt: skip
    for p in records.read(run_dir).pairs:
        for head, key in (("KL ± se", "kl_mean_se_prompts"), ("top-1 ± se", "top1_agree_se_prompts")):
            assert float(shown[p.candidate][heads.index(head)]) == p.aggregates[key]
        assert p.aggregates["kl_mean_se_prompts"] != p.aggregates["kl_mean_se"]
    assert "over prompts" in page.locator(".wide:has(#summary) + p").inner_text()
    assert page.locator("svg.chart").count() == 2 + len(CANDIDATES)  # the CDF, KL by depth, and a histogram per pair
    # KL by context depth: a point per pair and bin, its tooltip the record's mean, higher on the page for more KL
    depth = page.locator("svg[aria-label='mean KL by context depth']")
    bins = {p.candidate: [b for b in p.aggregates["by_depth"] if b["positions"]] for p in records.read(run_dir).pairs}
    tips = depth.locator("circle title").all_text_contents()
    assert len(tips) == sum(map(len, bins.values())) and len(bins["s-chat-gptq-int4"]) >= 5
    for name, pair_bins in bins.items():
        for b in pair_bins:
            span = str(b["depth_lo"]) if b["depth_lo"] == b["depth_hi"] else f"{b['depth_lo']}–{b['depth_hi']}"
            se = f" ± {b['kl_mean_se']:.2g}" if b["windows"] > 1 else ""  # one window: no standard error
            text = f"{name}, depth {span}: mean KL {b['kl_mean']:.3g}{se}".replace("e-0", "e-")  # as the page writes exponents
            n, w = b["positions"], b["windows"]
            assert f"{text} over {n} position{'s' * (n != 1)} in {w} window{'s' * (w != 1)}" in tips
    hollow = depth.locator("circle[fill=white]").count()
    assert hollow == sum(b["windows"] < 5 for pair_bins in bins.values() for b in pair_bins) > 0
    assert "a hollow point is a bin from fewer than 5 windows" in page.locator("#depth + div + p").inner_text()
    height = "(s, n) => +[...s.querySelectorAll('circle')].find(c => c.textContent.startsWith(n + ',')).getAttribute('cy')"
    # each pair's first point: the more KL, the higher (smaller y); the order of the pairs is the weights' (it differs
    # between machines, whose CPUs train the zoo otherwise), so it is read from the record
    first = {name: pair_bins[0]["kl_mean"] for name, pair_bins in bins.items()}
    ys = [depth.evaluate(height, name) for name in sorted(first, key=first.get)]
    assert ys == sorted(ys, reverse=True) and ys[0] > ys[-1], ys
    assert page.locator("#heat-top1 td").count() == 7 * 7
    # the histograms share one axis (the same ticks under each), so that a pair further off sits further right: the
    # count-weighted mean bar position of the float16 pair (KL ~1e-6) is left of the Int4 build's (~1e-3)
    cards = {c.locator("h3").inner_text(): c.locator("svg.chart") for c in page.locator(".card", has=page.locator("svg.chart")).all()}
    ticks = [[t for t in svg.locator("text").all_text_contents() if t.startswith("1e")] for svg in cards.values()]
    assert len(cards) == len(CANDIDATES) and len(ticks[0]) >= 3 and all(t == ticks[0] for t in ticks)
    centre = "s => { let w = 0, n = 0; for (const r of s.querySelectorAll('rect')) { const c = +r.querySelector('title')" \
             ".textContent.split(' ')[0]; w += c * (+r.getAttribute('x')); n += c; } return w / n; }"
    assert cards["s-chat-fp16"].evaluate(centre) < cards["s-chat-gptq-int4"].evaluate(centre)
    overlap = "s => { const b = [...s.querySelectorAll('text')].filter(t => t.textContent.startsWith('1e')).map(t => t.getBBox());" \
              " return b.some((r, i) => i > 0 && r.x < b[i - 1].x + b[i - 1].width); }"
    assert not any(svg.evaluate(overlap) for svg in [*cards.values(), page.locator("svg.chart").first])  # tick labels apart
    assert page.locator("#warp tr").count() == 1 + 7
    # the models table: each model's loader, and the kernel of a quantized one
    rows = {r.split("\t")[0]: r.split("\t") for r in page.locator("#models tr").all_inner_texts()[1:]}
    assert rows["s-chat-gptq-int4"][4] == "transformers\nTorchAtenLinear" and rows["s-chat-fp32"][4] == "transformers"
    assert rows["s-chat-fp32"][3] == "cpu"  # where its weights were is what its device says: not repeated
    # llama.cpp's rows, a column per candidate, in its units: Δp and same top p in % (± a standard error)
    assert page.locator("#llama-table tr").count() == 1 + len(llama_report.LLAMA_ROWS)
    heads = page.locator("#llama-table tr").first.locator("th").all_inner_texts()[1:]
    pairs = {p.candidate: p.aggregates for p in records.read(run_dir).pairs}
    assert heads == list(pairs)
    sig = html_format.sig  # test_numbers_on_the_page_keep_their_digits checks it
    for label, fmt in (("Mean Δp", lambda a: f"{sig(100 * a['delta_p_mean'], 100 * a['delta_p_mean_se'])} %"),
                       ("Same top p", lambda a: f"{sig(100 * a['top1_agree'], 100 * a['top1_agree_se'])} %"),
                       ("Mean PPL(Q)-PPL(base)", lambda a: sig(a['ppl_diff'], a['ppl_diff_se'])),
                       ("Cor(ln(PPL(Q)), ln(PPL(base)))", lambda a: f"{sig(100 * a['nll_correlation'], near=100.0)}%")):  # fmt: skip
        cells = page.locator("#llama-table tr", has=page.locator("td", has_text=label)).first.locator("td").all_inner_texts()
        assert cells == [label] + [fmt(a) for a in pairs.values()], label
    # sorting by mean KL puts fp16 (~1e-6) first and a different model last
    page.locator("#summary th", has_text="KL mean").click()
    order = page.locator("#summary tbody tr td:first-child").all_inner_texts()
    kl = {p.candidate: p.aggregates["kl_mean"] for p in records.read(run_dir).pairs}
    assert [o.split()[0] for o in order] == sorted(kl, key=kl.get)
    # the token view: a click on a scored token shows both models' top-5
    assert page.locator("#tokens-out span.tok").count() > 5
    page.locator("#tokens-out span.tok").nth(3).click()
    assert page.locator("#detail table").count() == 2
    # each table: the model's top 5, the text's next token in bold among them, or in a row of its own below them
    below = page.locator("#detail tr.below").count()
    assert page.locator("#detail tr.hit").count() == 2 and page.locator("#detail table tr").count() == 2 * 6 + below
    shown = [t for t in page.locator("#detail td").all_inner_texts() if not t.startswith('"') and not t.startswith("#")]
    assert len(shown) == 10 + below and all(re.fullmatch(r"0|[1-9]\.\d{3}(e-\d+)?|0\.0*[1-9]\d{3}", t) for t in shown), shown  # 4 digits
    # the bold rows' probabilities are the models' of the next token: exp(-NLL) in positions.csv.gz, to 4 digits
    at = int(re.match(r"position (\d+): ", page.locator("#detail p").first.inner_text())[1])
    pair, prompt = page.locator("#pair-select").input_value(), page.locator("#prompt-select option:checked").inner_text().split(" (")[0]
    with gzip.open(run_dir / "positions.csv.gz", "rt", newline="") as f:
        row = next(r for r in csv.DictReader(f) if (r["candidate"], r["prompt"], int(r["position"])) == (pair, prompt, at))
    n = int(row["depth"])  # how many tokens the models had: the position's depth in its window
    assert f"as each model predicted it from the {n} token{'s' * (n != 1)} before it in its window" in page.locator("#detail p").first.inner_text()
    assert page.locator("#detail td.token").first.evaluate("e => getComputedStyle(e).whiteSpace") == "pre"  # "  " is not " "
    hits = [float(r.locator("td").nth(1).inner_text()) for r in page.locator("#detail tr.hit").all()]
    assert hits == pytest.approx([math.exp(-float(row["nll_ref"])), math.exp(-float(row["nll_cand"]))], rel=1e-3)
    # the per-prompt table: the pair's prompts.csv rows, most drift first; a click on a name shows that prompt
    page.locator("#pair-select").select_option("s-chat-gptq-int4")
    csv_rows = [r for r in csv.DictReader((run_dir / "prompts.csv").open()) if r["candidate"] == "s-chat-gptq-int4"]
    table = page.locator("#prompt-table tbody tr")
    assert table.count() == len(csv_rows) == 10
    names = table.locator("td:first-child").all_text_contents()
    assert names == [r["prompt"] for r in sorted(csv_rows, key=lambda r: -float(r["kl_mean"]))]
    worst = next(r for r in csv_rows if r["prompt"] == names[0])
    cells = table.first.locator("td").all_text_contents()
    js_exp = f"{float(worst['kl_mean']):.2e}".replace("e-0", "e-")  # JavaScript's toExponential: 1.08e-3
    assert cells[1:3] == [worst["positions"], js_exp] and cells[6] == f"{float(worst['top1_agree']):.3f}"
    table.nth(3).locator("td").first.click()
    assert page.locator("#prompt-select option:checked").inner_text().startswith(names[3] + " ")
    # the keyboard does what the mouse does: Enter on a header sorts (again: the other way), on a token shows it
    header = page.locator("#summary th", has_text="KL mean")
    header.focus()
    page.keyboard.press("Enter")
    assert header.get_attribute("aria-sort") == "descending"
    assert [o.split()[0] for o in page.locator("#summary tbody tr td:first-child").all_inner_texts()] == sorted(kl, key=kl.get)[::-1]
    page.locator("#tokens-out span.tok").nth(5).focus()
    page.keyboard.press("Enter")
    assert page.locator("#tokens-out span.tok").nth(5).get_attribute("class") == "tok sel"
    # nothing is wider than a 1400-pixel window: wide tables scroll in their own boxes, the page does not
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    page.set_viewport_size({"width": 390, "height": 800})  # nor on a phone, where the CDF keeps 600 px and scrolls in its box
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.locator("svg.chart").first.bounding_box()["width"] >= 600
    page.set_viewport_size({"width": 1400, "height": 420})
    shot = run_dir.parent / "screenshot.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 50_000 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert seen["errors"] == [] and len(seen["requests"]) == 1


def test_html_payloads_in_prompts_show_as_text_and_run_nothing(browser, micro_run):
    run_dir, _ = micro_run
    page, seen = open_page(browser, run_dir / "index.html")
    select = page.locator("#prompt-select")
    newlines = 0
    for option in select.locator("option").all():
        if option.inner_text().startswith("xss-"):
            select.select_option(option.get_attribute("value"))
            shown = page.locator("#tokens-out").inner_text()
            assert "<script>window.__pwned=" in shown
            # every scored token has width, and a mouse click on it works: a newline token shows as "↵" and its break
            widths = page.locator("#tokens-out span.tok").evaluate_all("s => s.map(e => e.getBoundingClientRect().width)")
            assert min(widths) > 0, widths
            page.locator("#tokens-out span.tok").last.click()
            assert page.locator("#detail table").count() == 2
            breaks = page.locator("#tokens-out span.tok", has_text="↵")
            if breaks.count():  # the chat template ends each turn with a line break, a token of its own
                breaks.last.click()
                assert "\\n" in page.locator("#detail p").first.inner_text()
                newlines += 1
    assert any(o.startswith('xss-<img src=x onerror="window.__pwned=') for o in select.locator("option").all_inner_texts())
    assert newlines == 1  # xss-chat's
    assert page.evaluate("typeof window.__pwned") == "undefined"
    assert page.locator("img").count() == 0 and page.locator("#tokens-out script").count() == 0
    assert seen["errors"] == [] and len(seen["requests"]) == 1  # an <img src=x> that rendered would request x


def test_a_long_runs_token_view_holds_the_first_prompts_only(micro_run):
    """Past its budget of positions the page's token view holds the first prompts whose positions fit (a prefix of
    every per-position array, in prompt order), and says how many of how many; the per-prompt table keeps them all."""
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    positions = {p.candidate: records.load_positions(run_dir, p) for p in rec.pairs}
    tokens = records.load_tokens(run_dir, rec)
    full = token_view.view_data(run_dir, rec, positions, tokens)
    n = len(full["pos"]["prompt"])
    assert "view" not in full and n == rec.pairs[0].aggregates["positions"]
    assert token_view.view_data(run_dir, rec, positions, tokens, budget=n) == full  # exactly at the budget: all of it
    budget = n // 3
    cut = token_view.view_data(run_dir, rec, positions, tokens, budget=budget)
    counts = np.bincount(full["pos"]["prompt"])
    first = int(np.searchsorted(np.cumsum(counts), budget, side="right"))  # the prompts whose rows fit the budget together
    k = int(counts[:first].sum())
    assert cut["view"] == {"prompts": first, "of_prompts": len(counts), "positions": k, "of_positions": n, "budget": budget}
    assert 0 < k <= budget and k + counts[first] > budget and first < len(counts)
    assert all(cut["pos"][key] == full["pos"][key][:k] for key in full["pos"])
    assert all(cut["kl"][c] == full["kl"][c][:k] for c in full["kl"])
    assert all(cut["top"][m][part] == full["top"][m][part][: 5 * k] for m in full["top"] for part in ("ids", "probs"))
    assert [p["id"] for p in cut["prompts"]] == [p["id"] for p in full["prompts"]] and cut["prompt_rows"] == full["prompt_rows"]
    assert cut["prompts"][:first] == full["prompts"][:first] and all(p["texts"] == [] for p in cut["prompts"][first:])
    # a single prompt longer than the budget is shown whole: the view never holds no prompt
    assert token_view.view_data(run_dir, rec, positions, tokens, budget=1)["view"]["prompts"] == 1


def test_the_cut_token_view_in_a_browser(browser, micro_run, tmp_path, capsys):
    run_dir, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    budget = records.read(run_dir).pairs[0].aggregates["positions"] // 3
    assert main(["report", str(copy), "--view-positions", str(budget)]) == 0
    big, small = (run_dir / "index.html").stat().st_size, (copy / "index.html").stat().st_size
    assert small < big * 0.6, (small, big)
    page, seen = open_page(browser, copy / "index.html")
    note = page.locator("#view-cut").inner_text()
    assert re.search(rf"holds the first (\d+) of 10 prompts \((\d+) of \d+ positions, at most {budget}\)", note), note
    shown = int(re.search(r"first (\d+)", note)[1])
    assert page.locator("#prompt-select option").count() == shown and page.locator("#prompt-table tbody tr").count() == 10
    page.locator("#tokens-out span.tok").nth(2).click()
    assert page.locator("#detail table").count() == 2
    assert seen["errors"] == [] and [m for m in seen["console"] if m[0] in ("error", "warning")] == []
    for bad in ("0", "-3", "many"):
        with pytest.raises(SystemExit):
            main(["report", str(copy), "--view-positions", bad])
        assert "is not a whole number, 1 or more" in capsys.readouterr().err


def test_the_throughput_table_scrolls_in_its_own_box(browser, micro_run, tmp_path):
    """A run record with `harness bench`'s result attached: its table (13 columns) scrolls in its own box at a narrow
    window, as the other wide tables do, and the page itself does not; the page breaks no axe-core rule."""
    run_dir, _ = micro_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    rec = records.read(copy)
    case = {"impl": "fused-cpu", "dtype": "bfloat16", "inputs": "raw", "filter": "top-k", "rows_per_s": 48591.2, "gbps": 14.77,
            "near_read_gbps": 29.6, "fraction_of_ceiling": 0.4989, "fraction_of_bound": 0.4989, "fraction_of_run_ceiling": 0.4907,
            "speedup_vs_snippet": 1016.0, "median_s": 0.0052, "iqr_s": 0.0004}  # fmt: skip
    rec.throughput = {"device": "cpu", "device_name": "a CPU", "read_ceiling_gbps": 30.1, "copy_ceiling_gbps": 13.0,
                      "write_ceiling_gbps": 18.1, "results": [case | {"batch": b} for b in (16, 256, 4096)]}  # fmt: skip
    records.write(copy, rec)
    report.render(copy)
    page, seen = open_page(browser, copy / "index.html")
    assert page.locator("#bench tbody tr").count() == 3 and page.locator("div.wide > #bench").count() == 1
    for width in (800, 390):
        page.set_viewport_size({"width": width, "height": 800})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), width
    assert axe_violations(page) == [] and seen["errors"] == []


def test_the_page_passes_axe_cores_accessibility_checks(browser, micro_run):
    """axe-core's rules (WCAG 2 A and AA, and its best practices: contrast, names of controls, landmarks, tables,
    keyboard access to scroll boxes) find nothing on a run's page, at a desktop's width and a phone's, with a prompt's
    tokens and a token's top-5 shown and a table sorted; and a box takes the keyboard's focus exactly where it
    scrolls."""
    run_dir, _ = micro_run
    page, seen = open_page(browser, run_dir / "index.html")
    page.locator("#tokens-out span.tok").nth(2).click()
    page.locator("#prompt-table th").nth(2).click()
    for width in (1400, 390):
        page.set_viewport_size({"width": width, "height": 900})
        page.evaluate("window.dispatchEvent(new Event('resize'))")
        assert axe_violations(page) == [], width
        boxes = page.evaluate("[...document.querySelectorAll('.wide, .tall, pre, #tokens-out')].map(b => "
                              "[b.scrollWidth > b.clientWidth + 1 || b.scrollHeight > b.clientHeight + 1, b.getAttribute('tabindex')])")
        assert boxes and all((tab == "0") == scrolls for scrolls, tab in boxes), (width, boxes)
        assert any(scrolls for scrolls, _ in boxes) and (width == 390 or not all(scrolls for scrolls, _ in boxes))
    assert seen["errors"] == []


def test_a_failed_run_renders_its_error(browser, micro_run, tmp_path):
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    failed = tmp_path / "failed"
    failed.mkdir()
    records.write(failed, rec.model_copy(update={"status": "error", "error": "ExtractError: <b>NaN</b> logits", "pairs": [],
                                                 "variants": {}}))  # a failed run's record has no models' facts
    page, seen = open_page(browser, report.render(failed))
    banner = page.locator(".error").inner_text()
    assert "This run failed. ExtractError: <b>NaN</b> logits" in banner and "the same command again reuses them" in banner
    assert page.locator("#models").count() == 0 and "resolved config" in page.locator("body").inner_text()  # no empty table
    assert axe_violations(page) == [] and seen["errors"] == []


def test_the_summarys_standard_errors_say_what_they_are_over():
    """The summary's ± cells: the error over prompts where the record has a finite one (its tooltip and footnote say
    so), else the per-position one with no such claim: a record from before 2026-12-07, a run of one prompt (whose
    error over prompts is the per-position one), a NaN. Each cell's data-v holds the value shown."""
    import re

    def record(extra: dict, prompts: int) -> records.RunRecord:
        agg = {"positions": 40, "kl_mean": 2e-3, "kl_mean_se": 1e-4, "top1_agree": 0.97, "top1_agree_se": 0.003, "by_confidence": []} | extra
        rows = [{"prompt": f"p{i}", "positions": 40 // prompts} for i in range(prompts)]
        return records.RunRecord(
            schema_version=records.SCHEMA_VERSION, run_id="r", status="ok", created_at="2026-12-07T00:00:00Z", config={},
            noise_floor=None, inputs={}, versions={}, machine={}, variants={"q": {}},
            pairs=[records.PairRecord(reference="ref", candidate="q", aggregates=agg, prompts=rows, positions_file="-")],
        )  # fmt: skip

    def shown(rec):
        page = html_report.summary_table(rec)
        cells = re.findall(r'<td data-v="([^"]*)">', page)
        heads = [h for h in re.findall(r"<th[^>]*>([^<]*)</th>", page) if h != "candidate"]
        return dict(zip(heads, cells[1:])), page

    new = {"kl_mean_se_prompts": 2.5e-4, "top1_agree_se_prompts": 0.006}
    cells, page = shown(record(new, 8))
    assert float(cells["KL ± se"]) == 2.5e-4 and float(cells["top-1 ± se"]) == 0.006
    assert "standard error of the mean KL, over prompts" in page and "standard errors over prompts" in page
    for rec in (record({}, 8), record(new | {"kl_mean_se_prompts": 1e-4, "top1_agree_se_prompts": 0.003}, 1),
                record({"kl_mean_se_prompts": math.nan, "top1_agree_se_prompts": math.nan}, 8)):  # fmt: skip
        cells, page = shown(rec)
        assert float(cells["KL ± se"]) == 1e-4 and float(cells["top-1 ± se"]) == 0.003
        assert "over prompts" not in page


def test_summary_columns_follow_the_runs_top_k():
    """summary.csv has a topK_overlap column for each K the run measured (metrics.top_k need not hold 5)."""
    from types import SimpleNamespace

    pair = SimpleNamespace(aggregates={"kl_mean": 0.1, "top20_overlap": 0.9, "top3_overlap": 0.8})
    cols = report.summary_columns(SimpleNamespace(pairs=[pair], noise_floor=None))
    at = cols.index("top1_agree_se")
    assert cols[at + 1 : at + 3] == ["top3_overlap", "top20_overlap"] and "top5_overlap" not in cols
    assert "kl_floor_multiple" not in cols
    assert report.summary_columns(SimpleNamespace(pairs=[pair], noise_floor="bf16"))[-4:] == ["kl_floor_multiple", "kl_mean_se_prompts", "top1_agree_se_prompts", "ln_ppl_ratio_se_prompts"]
    cross = SimpleNamespace(aggregates={"kl_mean": 0.2, "aligned_of": 90, "bpb_cand": 4.2})
    cols = report.summary_columns(SimpleNamespace(pairs=[pair, cross], noise_floor=None))
    assert cols[-len(report.CROSS_COLUMNS) :] == report.CROSS_COLUMNS and "bpb_diff_se" in cols  # a cross_vocab pair's


def test_models_table_says_where_a_sharded_model_was_and_which_kernel_ran():
    sharded = {"device": "sharded", "placed_on": ["cpu", "cuda:0", "cuda:1"], "loader": "gptqmodel",
               "backend": "gptq_marlin", "kernels": ["MarlinLinear"]}  # fmt: skip
    assert html_run._placed(sharded) == " (cpu, cuda:0, cuda:1)"  # spilled to the CPU: shown
    assert html_run._placed({"device": "cuda", "placed_on": ["cuda:0"]}) == ""
    assert html_run._placed({"device": "cpu"}) == ""  # a record from before placed_on
    assert html_run._loader(sharded) == "gptqmodel (gptq_marlin)<br><span class=small>MarlinLinear</span>"
    assert html_run._loader({"device": "cpu"}) == "transformers"


def test_models_table_names_the_versions_a_reused_store_was_filled_with():
    v = {"reused_shards": 5, "shards": 5, "first_extract_s": 2.0}
    rec = records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id="r", status="ok", created_at="2026-01-01T00:00:00Z",
                            versions={"torch": "2.13.0", "transformers": "5.24.0"},
                            variants={"same": v | {"filled_by": {"versions": {"torch": "2.13.0", "transformers": "5.24.0"}}},
                                      "older": v | {"filled_by": {"versions": {"torch": "2.12.0", "transformers": "5.24.0"}}},
                                      "unknown": v})  # fmt: skip
    rows = {r.split("</td>")[0]: r for r in html_run.metadata_section(rec).split("<tr><td>")[1:]}  # model name -> its row
    assert "(store reused; filling it took 2.0; filled with torch 2.12.0)" in rows["older"]
    assert "filled with" not in rows["same"] and "filled with" not in rows["unknown"]


# llama.cpp's kl_divergence() summary (tools/perplexity/perplexity.cpp): each label, the aggregate it prints, the
# aggregate of its ± (or None) and its scale (Δp and "Same top p" in %). Written out here, not read from LLAMA_ROWS.
LLAMA_CPP_MEANING = [
    ("Mean PPL(Q)", "ppl_cand", "ppl_cand_se", 1), ("Mean PPL(base)", "ppl_ref", "ppl_ref_se", 1),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "nll_correlation", None, 100),
    ("Mean ln(PPL(Q)/PPL(base))", "ln_ppl_ratio", "ln_ppl_ratio_se", 1),
    ("Mean PPL(Q)/PPL(base)", "ppl_ratio", "ppl_ratio_se", 1), ("Mean PPL(Q)-PPL(base)", "ppl_diff", "ppl_diff_se", 1),
    ("Mean    KLD", "kl_mean", "kl_mean_se", 1), ("Maximum KLD", "kl_max", None, 1),
    *((f"{q:>4.1f}%   KLD", "kl_p" + f"{q:g}".replace(".", "_"), None, 1) for q in (99.9, 99, 95, 90)),
    ("Median  KLD", "kl_median", None, 1),
    *((f"{q:>4.1f}%   KLD", "kl_p" + f"{q:g}".replace(".", "_"), None, 1) for q in (10, 5, 1, 0.1)),
    ("Minimum KLD", "kl_min", None, 1),
    ("Mean    Δp", "delta_p_mean", "delta_p_mean_se", 100), ("Maximum Δp", "delta_p_max", None, 100),
    *((f"{q:>4.1f}%   Δp", "delta_p_p" + f"{q:g}".replace(".", "_"), None, 100) for q in (99.9, 99, 95, 90, 75)),
    ("Median  Δp", "delta_p_median", None, 100),
    *((f"{q:>4.1f}%   Δp", "delta_p_p" + f"{q:g}".replace(".", "_"), None, 100) for q in (25, 10, 5, 1, 0.1)),
    ("Minimum Δp", "delta_p_min", None, 100),
    ("RMS Δp", "delta_p_rms", "delta_p_rms_se", 100), ("Same top p", "top1_agree", "top1_agree_se", 100),
]  # fmt: skip


def test_every_kl_report_row_prints_its_own_aggregate():
    """Each line of kl_report.txt carries the aggregate llama.cpp's label means (and its se, and its % scale): every
    aggregate a distinct made-up value, so a row that reads another key, drops its scale or its se's scale, shows."""
    rng = np.random.default_rng(0)
    keys = {k for _, key, se, _ in LLAMA_CPP_MEANING for k in (key, se) if k}
    agg = {k: float(v) for k, v in zip(sorted(keys), rng.uniform(0.1, 0.9, len(keys)), strict=True)}  # all distinct
    agg["positions"] = 1000
    rec = records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id="r", status="ok", created_at="2026-01-01T00:00:00Z",
                            pairs=[records.PairRecord(reference="base", candidate="q", aggregates=agg, prompts=[], positions_file="-")])  # fmt: skip
    lines = {line.split(":")[0].strip(): line.split(": ", 1)[1] for line in llama_report.text(rec).splitlines() if ": " in line}
    assert len(lines) == len(LLAMA_CPP_MEANING)
    for label, key, se, scale in LLAMA_CPP_MEANING:
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", lines[label.strip()])]
        want = [agg[key] * scale] + ([agg[se] * scale] if se else [])
        assert numbers == pytest.approx(want, rel=1e-3), label


def test_infinities_on_the_page_keep_their_sign():
    assert html_format.num(math.inf) == "∞" and html_format.num(-math.inf) == "−∞"
    assert html_format.sig(-math.inf) == "−∞"


def test_positions_csv_flags_are_0_and_1_and_average_to_the_agreement(micro_run):
    """top1_agree in positions.csv.gz as 0/1 (a spreadsheet or awk averages them), not True/False; their mean per
    pair is the record's top1_agree."""
    run_dir, _ = micro_run
    rec = records.read(run_dir)
    with gzip.open(run_dir / "positions.csv.gz", "rt", newline="") as f:
        rows = list(csv.DictReader(f))
    for p in rec.pairs:
        flags = [r["top1_agree"] for r in rows if r["candidate"] == p.candidate]
        assert set(flags) <= {"0", "1"}
        assert sum(map(int, flags)) / len(flags) == pytest.approx(p.aggregates["top1_agree"], rel=1e-12)


def test_the_console_table_keeps_its_columns_for_a_huge_ppl_ratio():
    """A broken build's PPL ratio (1e7 in a review's run) is printed in 9 characters like any other, so the columns
    stay in line; each cell still reads back as its value."""
    agg = {"positions": 512, "kl_mean": 14.47, "kl_mean_se": 0.3, "kl_p99": 30.1, "js_mean": 0.6, "top1_agree": 0.0}
    rec = records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id="r", status="ok", created_at="2026-01-01T00:00:00Z",
                            pairs=[records.PairRecord(reference="ref", candidate=c, aggregates=agg | {"ppl_ratio": r}, prompts=[],
                                                      positions_file="-") for c, r in (("fine", 1.0004), ("broken", 10673586.0357))])  # fmt: skip
    lines = report.table(rec).splitlines()
    assert len({len(line) for line in lines[1:4]}) == 1  # header and both rows equally wide
    assert [float(line.split()[-1]) for line in lines[2:4]] == [1.0004, pytest.approx(1.067e7, rel=1e-3)]


@pytest.mark.parametrize("text", ["", '{"verdict": "pass", "brea', "[1]", '{"breaches": "x"}', '{"breaches": [{"pair": "int4"}]}'])
def test_a_damaged_gate_file_leaves_the_report_a_note(tmp_path, text):
    """gate.json cut short or edited by hand crashed `harness report` (exit 3); the page now says it cannot be read."""
    (tmp_path / "gate.json").write_text(text)
    html = html_run.gate_section(tmp_path)
    assert "gate.json cannot be read" in html and "harness check --run</code> on this run writes it again" in html
    (tmp_path / "gate.json").write_text('{"verdict": "pass", "checks": 3, "breaches": [], "within_noise": []}')
    assert "Quantization gate: <span class=\"verdict pass\">PASS</span>" in html_run.gate_section(tmp_path)


def test_the_store_rounding_note_names_the_pairs_it_makes_up_5_percent_of(tmp_path):
    """The reference's store rounding (its facts' store_rounding_kl) is named in the console table and on the page for
    each pair whose mean KL it makes up 5% or more of, with that share; a pair far above it, one at exactly 0 (the
    reference's own rows) and one at +inf are not named; no note without the figure (a float32 store) or below 5%; a
    figure that is not a number is an error naming it when the record is read."""

    def record(facts: dict, kls: dict) -> records.RunRecord:
        pairs = [records.PairRecord(reference="ref", candidate=name, prompts=[], positions_file="-", aggregates={
            "positions": 10, "kl_mean": kl, "kl_mean_se": 0.0, "kl_p99": kl, "js_mean": kl, "top1_agree": 1.0,
            "ppl_ratio": 1.0, "by_confidence": []}) for name, kl in kls.items()]  # fmt: skip
        return records.RunRecord(schema_version=records.SCHEMA_VERSION, run_id="r", status="ok", created_at="2026-12-07T00:00:00Z",
                                 config={"store_dtype": "float16"}, variants={"ref": facts}, pairs=pairs)  # fmt: skip

    kls = {"fp16": 4e-6, "int8": 1.6e-5, "int4": 4e-3, "same": 0.0, "filtered": math.inf}
    rec = record({"store_rounding_kl": 8e-7}, kls)
    note = html_report.rounding_note(rec)
    assert "float16 store" in note and "8.00e-07 nats" in note and "20% of fp16's, 5% of int8's." in note
    assert not any(name in note for name in ("int4", "same", "filtered"))
    assert report.table(rec).splitlines()[-1] == f"note: {note}"
    assert '<p class=small id=rounding>Note: the reference&#x27;s float16 store' in html_report.summary_table(rec)
    for quiet in (record({}, kls), record({"store_rounding_kl": 8e-7}, {"int8": 1.61e-5, "int4": 4e-3})):
        assert html_report.rounding_note(quiet) is None and "note:" not in report.table(quiet)
        assert "id=rounding" not in html_report.summary_table(quiet)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(rec.model_dump() | {"variants": {"ref": {"store_rounding_kl": "8e-7"}}}))
    with pytest.raises(records.RecordError, match="store_rounding_kl"):
        records.read(path)
