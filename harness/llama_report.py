"""llama.cpp's `llama-perplexity --kl-divergence` summary, line for line: its rows, labels, units and fixed-point
formats, filled from a pair's aggregates. `kl_report.txt` is this text, a block a pair; the HTML report shows the
same rows.

    python -m harness.llama_report reports/latest      # prints a run's kl_report.txt
"""

from __future__ import annotations

import math

from harness import records


def llama_number(x, width: int, decimals: int) -> str:
    """printf's `%{width}.{decimals}f`, as llama.cpp prints, with more decimals (up to 24) where that would show
    fewer than 4 significant digits: a float16-vs-float32 KL of 4.5e-6 reads 0.000004531, not 0.000005, and a median
    Δp of -5.207e-12 % -0.000000000005207%. Never an exponent, so that scripts written for llama.cpp's log read the
    number whole."""
    x = float("nan") if x is None else float(x)  # float(): "inf" from a strict-JSON record
    x = 0.0 if x == 0 else x  # -0.0 (a Δp of a model against itself) prints as 0.000, not -0.000
    if math.isfinite(x) and x != 0:
        decimals = min(max(decimals, 3 - math.floor(math.log10(abs(x)))), 24)
    return f"{x:{width}.{decimals}f}"


_F, _P = (10, 6), (6, 3)  # llama.cpp's %10.6lf (perplexity, KL) and %6.3lf (Δp and same top p, in %)


def _q(stat: str, q: float, fmt, scale: int, unit: str) -> tuple:
    return (f"{q:>4.1f}%   {stat}", f"{'kl' if stat == 'KLD' else 'delta_p'}_p{q:g}".replace(".", "_"), fmt, None, scale, unit)


# llama.cpp's `llama-perplexity --kl-divergence` summary, line for line (tools/perplexity/perplexity.cpp,
# kl_divergence()): (label as it prints it, aggregate key, (width, decimals) of the value, of its ± or None,
# scale, unit). A row without a key is a section's title.
LLAMA_ROWS = [
    ("====== Perplexity statistics ======", None, None, None, 1, ""),
    *((label.ljust(30), key, _F, _F, 1, "") for label, key in (("Mean PPL(Q)", "ppl_cand"), ("Mean PPL(base)", "ppl_ref"))),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "nll_correlation", (6, 2), None, 100, "%"),
    *((label.ljust(30), key, _F, _F, 1, "") for label, key in (
        ("Mean ln(PPL(Q)/PPL(base))", "ln_ppl_ratio"), ("Mean PPL(Q)/PPL(base)", "ppl_ratio"), ("Mean PPL(Q)-PPL(base)", "ppl_diff"))),
    ("====== KL divergence statistics ======", None, None, None, 1, ""),
    ("Mean    KLD", "kl_mean", _F, _F, 1, ""), ("Maximum KLD", "kl_max", _F, None, 1, ""),
    *(_q("KLD", q, _F, 1, "") for q in (99.9, 99, 95, 90)),
    ("Median  KLD", "kl_median", _F, None, 1, ""),
    *(_q("KLD", q, _F, 1, "") for q in (10, 5, 1, 0.1)),
    ("Minimum KLD", "kl_min", _F, None, 1, ""),
    ("====== Token probability statistics ======", None, None, None, 1, ""),
    ("Mean    Δp", "delta_p_mean", _P, (5, 3), 100, " %"), ("Maximum Δp", "delta_p_max", _P, None, 100, "%"),
    *(_q("Δp", q, _P, 100, "%") for q in (99.9, 99, 95, 90, 75)),
    ("Median  Δp", "delta_p_median", _P, None, 100, "%"),
    *(_q("Δp", q, _P, 100, "%") for q in (25, 10, 5, 1, 0.1)),
    ("Minimum Δp", "delta_p_min", _P, None, 100, "%"),
    ("RMS Δp    ", "delta_p_rms", _P, (5, 3), 100, " %"), ("Same top p", "top1_agree", _P, (5, 3), 100, " %"),
]  # fmt: skip


def llama_value(a: dict, row: tuple) -> str:
    """One row's value as llama.cpp prints it after the colon: `v ± se unit` or `v unit` (see llama_number)."""
    _, key, fmt, se_fmt, scale, unit = row
    v = a.get(key)
    text = llama_number(None if v is None else float(v) * scale, *fmt)
    if se_fmt is not None:
        se = a.get(f"{key}_se")
        text += " ± " + llama_number(None if se is None else float(se) * scale, *se_fmt)
    return text + unit


def cross_vocab_rows(a: dict) -> list[str]:
    """A cross_vocab pair's section after llama.cpp's (which has no such pair): what its numbers are over (the aligned
    positions, the shared tokens and their mass) and each model's bits per byte on its own tokens, the comparison
    that holds across tokenizers where PPL over tokens does not."""
    rows = [
        "====== Cross-vocabulary statistics ======",
        f"{'Positions compared':<30}: {a['positions']} of {a['aligned_of']} ({a['aligned']} line up: both models start "
        f"a token at the same byte; {a['positions']} of them predict a token both vocabularies hold)",
        f"{'Shared tokens':<30}: {a['shared_tokens']} (both distributions renormalised over them)",
        f"{'Mass on them, base':<30}: {llama_number(100 * (1 - a['outside_mass_ref']), *_P)} %",
        f"{'Mass on them, Q':<30}: {llama_number(100 * (1 - a['outside_mass_cand']), *_P)} %",
    ]
    if a.get("bpb_bytes"):
        rows += [
            f"{'Bits per byte (Q)':<30}: {llama_number(a['bpb_cand'], *_F)}",
            f"{'Bits per byte (base)':<30}: {llama_number(a['bpb_ref'], *_F)}",
            f"{'Bits per byte (Q)-(base)':<30}: {llama_number(a['bpb_diff'], *_F)} ± {llama_number(a['bpb_diff_se'], *_F)}",
            f"{'Bytes (spans)':<30}: {a['bpb_bytes']} ({a['bpb_spans']} spans between shared splits)",
        ]
    return rows


def text(record: records.RunRecord) -> str:
    """Each pair as llama.cpp prints its summary (more decimals where its %10.6lf would show fewer than 4 digits, see
    llama_number), under a `######` line naming the pair; a cross_vocab pair's header says what its numbers are
    over, and a section of its own follows llama.cpp's (cross_vocab_rows)."""
    out = []
    for p in record.pairs:
        a = p.aggregates
        over = (f" (cross_vocab: of the positions that line up, those that predict a shared token; over the "
                f"{a['shared_tokens']} shared tokens)"
                if "aligned_of" in a else "")  # fmt: skip
        out.append(f"###### {p.candidate} (Q) against {p.reference} (base), {a.get('positions')} positions{over}")
        for row in LLAMA_ROWS:
            if row[1] is None:
                out += [row[0]] if out[-1].startswith("######") else ["", row[0]]  # a blank line ends each section
            else:
                out.append(f"{row[0]}: {llama_value(a, row)}")
        if "aligned_of" in a:
            out += ["", *cross_vocab_rows(a)]
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    from harness import script

    print(text(records.read((script.args(__doc__, 0, 1) or ["reports/latest"])[0])), end="")
