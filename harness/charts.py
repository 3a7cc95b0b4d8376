"""The report's charts as inline SVG (no script, no network): the KL CDF of every pair, a KL histogram per pair, and
the colour scale of the heatmaps and confidence tables.

    python -m harness.charts reports/latest > /tmp/cdf.svg      # one run's KL CDF, to open in a browser
"""

from __future__ import annotations

import html
import math
import re

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def _decades(values: list[np.ndarray]) -> tuple[int, int]:
    positive = np.concatenate([v[(v > 0) & np.isfinite(v)] for v in values] or [np.array([1.0])])
    if not len(positive):
        return -8, 0
    return max(-12, math.floor(math.log10(positive.min()))), max(-11, math.ceil(math.log10(positive.max())))


def _axis(x0: float, x1: float, y1: float, lo: int, hi: int, sx) -> list[str]:
    step = max(1, math.ceil((hi - lo) * 40 / (x1 - x0)))  # a label ("1e-10") takes up to ~35 px: no two overlap
    out = [f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#444"/>']
    for d in range(lo, hi + 1, step):
        x = sx(d)
        out.append(f'<line x1="{x:.1f}" y1="{y1}" x2="{x:.1f}" y2="{y1 + 4}" stroke="#444"/>')
        anchor = "start" if d == lo else "end" if d == hi else "middle"  # the end labels stay inside the box
        out.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="{anchor}">1e{d}</text>')
    return out


def cdf_svg(series: dict[str, np.ndarray], width: int = 720, height: int = 300) -> str:
    """Empirical CDF of each pair's per-position KL on a log axis (KL = 0 is drawn at the left edge)."""
    lo, hi = _decades(list(series.values()))
    x0, x1, y0, y1 = 50, width - 150, 10, height - 30
    sx = lambda d: x0 + (d - lo) / max(1, hi - lo) * (x1 - x0)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="KL CDF">']
    parts += _axis(x0, x1, y1, lo, hi, sx)
    for f in (0, 0.25, 0.5, 0.75, 1.0):
        y = y1 - f * (y1 - y0)
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/><text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{f:g}</text>')
    for i, (name, kl) in enumerate(series.items()):
        v = np.sort(np.asarray(kl, dtype=np.float64))
        n = len(v)
        idx = np.unique(np.linspace(0, n - 1, min(n, 300)).astype(int))
        logs = np.log10(np.clip(v[idx], 10.0**lo, 10.0**hi))
        pts = " ".join(f"{sx(d):.1f},{y1 - (k + 1) / n * (y1 - y0):.1f}" for d, k in zip(logs, idx, strict=True))
        color = PALETTE[i % len(PALETTE)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{pts}"><title>{html.escape(name)}</title></polyline>')
        parts.append(f'<rect x="{x1 + 12}" y="{y0 + 16 * i}" width="10" height="10" fill="{color}"/><text x="{x1 + 26}" y="{y0 + 9 + 16 * i}">{html.escape(name)}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 2}" text-anchor="middle">KL(reference ‖ candidate), nats</text>')
    parts.append(f'<text transform="translate(12 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">fraction of positions</text></svg>')
    return "".join(parts)


def decades(series: list[np.ndarray]) -> tuple[int, int]:
    """The log10 range (whole decades) that holds every positive finite value of these series: pass it to each
    hist_svg so that a report's histograms share one axis and read side by side."""
    return _decades([np.asarray(v, dtype=np.float64) for v in series])


def exponent(text: str) -> str:
    """Numbers' exponents as the page's script writes them (JavaScript's toExponential): 2.69e-6, not Python's 2.69e-06."""
    return re.sub(r"e([+-])0+(\d)", r"e\1\2", text)


def hist_svg(kl: np.ndarray, color: str, width: int = 360, height: int = 150, span: tuple[int, int] | None = None) -> str:
    """Histogram of per-position KL over log-spaced bins (4 a decade) across `span` (decades(); else this series'
    own); positions with KL = 0 go to the first bin. Bar heights are each histogram's own: pairs differ in count."""
    v = np.asarray(kl, dtype=np.float64)
    lo, hi = span or _decades([v])
    bins = 4 * (hi - lo)
    logs = np.log10(np.clip(v[np.isfinite(v)], 10.0**lo, 10.0**hi))
    counts, _ = np.histogram(logs, bins=bins, range=(lo, hi))
    x0, x1, y0, y1 = 10, width - 10, 6, height - 36
    sx = lambda d: x0 + (d - lo) / max(1, hi - lo) * (x1 - x0)  # noqa: E731
    top = max(1, counts.max())
    w = (x1 - x0) / bins
    parts = [f'<svg class="chart small" viewBox="0 0 {width} {height}" role="img" aria-label="KL histogram">']
    zeros = int((v == 0).sum())
    for i, c in enumerate(counts):
        h = c / top * (y1 - y0)
        edges = exponent(f"KL {10 ** (lo + i / 4):.2g} to {10 ** (lo + (i + 1) / 4):.2g}")
        what = f"{edges}" + (f", {zeros} of them exactly 0" if i == 0 and zeros else "")
        parts.append(f'<rect x="{x0 + i * w:.1f}" y="{y1 - h:.1f}" width="{w - 1:.1f}" height="{h:.1f}" fill="{color}"><title>{c} position{"" if c == 1 else "s"}, {what}</title></rect>')
    parts += _axis(x0, x1, y1, lo, hi, sx)
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 2}" text-anchor="middle">KL, nats{" (the same axis for every pair)" if span else ""}</text>')
    if np.isinf(v).any():
        parts.append(f'<text x="{x1}" y="{y0 + 10}" text-anchor="end">+{int(np.isinf(v).sum())} infinite</text>')
    if zeros:  # drawn in the first bin, but no KL of the axis: say how many
        parts.append(f'<text x="{x0}" y="{y0 + 10}">{zeros} exactly 0 (in the first bar)</text>')
    return "".join(parts) + "</svg>"


def heat(value: float | None, kind: str) -> str:
    """Background colour: green (close) to red (far); top-1 agreement on log10 of the disagreement, from 0.001 (green)
    to 0.5 (red), so that 0.96 and 1.0 look different; KL on log10 [-7, 1]."""
    if value is None or not math.isfinite(value):
        return "#eee"
    if kind == "top1":
        f = 1.0 - min(1.0, max(0.0, (math.log10(max(1.0 - value, 1e-3)) + 3) / (3 + math.log10(0.5))))
    else:
        f = 1.0 - min(1.0, max(0.0, (math.log10(max(value, 1e-12)) + 7) / 8))
    return f"hsl({120 * f:.0f},70%,{78 - 8 * f:.0f}%)"


def depth_span(b: dict) -> str:
    """A depth bin's tokens: "1", "2–3", ..."""
    return str(b["depth_lo"]) if b["depth_lo"] == b["depth_hi"] else f"{b['depth_lo']}–{b['depth_hi']}"


def depth_svg(series: dict[str, list[dict]], few: int = 0, width: int = 720, height: int = 260) -> str:
    """Each pair's mean KL by context depth (aggregate.depth_bins: powers of two), a point per bin with its ± one
    standard error, on a log KL axis; a hollow point where a bin comes from fewer than `few` windows; empty bins and
    KL = 0 leave gaps."""
    def k(b: dict) -> int:  # a bin's power of two: its place on the axis, whatever its cut bounds
        return b["depth_lo"].bit_length() - 1

    spans: dict[int, tuple[int, int]] = {}
    for b in (b for bins in series.values() for b in bins):
        lo_, hi_ = spans.get(k(b), (b["depth_lo"], b["depth_hi"]))
        spans[k(b)] = (min(lo_, b["depth_lo"]), max(hi_, b["depth_hi"]))
    values = [np.array([b["kl_mean"] for b in bins if b["positions"]], dtype=np.float64) for bins in series.values()]
    lo, hi = _decades(values)
    x0, x1, y0, y1 = 60, width - 150, 10, height - 42
    step = (x1 - x0) / max(1, len(spans))
    at = {key: x0 + step * (i + 0.5) for i, key in enumerate(sorted(spans))}
    sy = lambda v: y1 - (math.log10(min(max(v, 10.0**lo), 10.0**hi)) - lo) / max(1, hi - lo) * (y1 - y0)  # noqa: E731
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" aria-label="mean KL by context depth">',
             f'<line x1="{x0}" y1="{y1}" x2="{x1}" y2="{y1}" stroke="#444"/>']  # fmt: skip
    for d in range(lo, hi + 1, max(1, math.ceil((hi - lo) / 6))):
        y = sy(10.0**d)
        parts.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#ddd"/><text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">1e{d}</text>')
    for key, x in at.items():
        a, b = spans[key]
        parts.append(f'<text x="{x:.1f}" y="{y1 + 16}" text-anchor="middle">{depth_span({"depth_lo": a, "depth_hi": b})}</text>')
    for i, (name, bins) in enumerate(series.items()):
        color = PALETTE[i % len(PALETTE)]
        points = []
        for b in bins:
            x, v = at[k(b)], b["kl_mean"]
            if not b["positions"] or not v or not math.isfinite(v) or v <= 0:  # a gap: log10 has no 0
                points.append(None)
                continue
            se, n, w = b.get("kl_mean_se"), b["positions"], b.get("windows")
            tip = html.escape(exponent(f"{name}, depth {depth_span(b)}: mean KL {v:.3g}" + (f" ± {se:.2g}" if se and math.isfinite(se) else ""))
                              + f" over {n} position{'' if n == 1 else 's'}" + (f" in {w} window{'' if w == 1 else 's'}" if w else ""))  # fmt: skip
            if se and math.isfinite(se):
                parts.append(f'<line x1="{x:.1f}" y1="{sy(v + se):.1f}" x2="{x:.1f}" y2="{sy(max(v - se, 10.0**lo)):.1f}" stroke="{color}" stroke-opacity="0.5"/>')
            fill = f'fill="white" stroke="{color}" stroke-width="1.5"' if w is not None and w < few else f'fill="{color}"'
            parts.append(f'<circle cx="{x:.1f}" cy="{sy(v):.1f}" r="3" {fill}><title>{tip}</title></circle>')
            points.append(f"{x:.1f},{sy(v):.1f}")
        runs, run = [], []
        for p in [*points, None]:  # a line through each run of bins with a value
            if p is None:
                runs, run = (runs + [run] if len(run) > 1 else runs), []
            else:
                run.append(p)
        parts += [f'<polyline fill="none" stroke="{color}" stroke-width="1.4" points="{" ".join(r)}"/>' for r in runs]
        parts.append(f'<rect x="{x1 + 12}" y="{y0 + 16 * i}" width="10" height="10" fill="{color}"/><text x="{x1 + 26}" y="{y0 + 9 + 16 * i}">{html.escape(name)}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2}" y="{height - 4}" text-anchor="middle">context depth (tokens the model had before the position)</text>')
    parts.append(f'<text transform="translate(12 {(y0 + y1) / 2}) rotate(-90)" text-anchor="middle">mean KL, nats</text></svg>')
    return "".join(parts)


if __name__ == "__main__":
    from harness import records, script

    run = records.run_dir((script.args(__doc__, 0, 1) or ["reports/latest"])[0])
    record = records.read(run)
    print(cdf_svg({p.candidate: records.load_positions(run, p)["kl"] for p in record.pairs}).replace("<svg ", '<svg xmlns="http://www.w3.org/2000/svg" ', 1))
