"""How the report page writes values: HTML-escaped text, numbers to their significant digits (± a standard error),
fractions that do not round to 0 or 1, and JSON safe inside a <script> element.

    python -c "from harness.html_format import sig; print(sig(0.0123456, 2.1e-5))"     # 0.012346 ± 0.000021
"""

from __future__ import annotations

import html
import json
import math

from harness import records
from harness.charts import exponent


def esc(x) -> str:
    """Any value as HTML text, quotes escaped too (safe inside an attribute)."""
    return html.escape(str(x), quote=True)


def num(x, spec: str = ".3g") -> str:
    """A number in `spec`, its exponent as JavaScript writes it (2.69e-6); "–" for None or NaN, ∞ and −∞ for the
    infinities."""
    if isinstance(x, str):  # "inf" / "-inf" from a strict-JSON file
        return esc(x)
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return exponent(format(x, spec))


def fraction(x, decimals: int) -> str:
    """A fraction (an agreement, a rate) to `decimals` places, with more (up to 6) where it would read as exactly 0 or
    1 without being so: an agreement of 0.99956 is 0.9996, not 1.000."""
    if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
        return num(x)
    text = f"{x:.{decimals}f}"
    while decimals < 6 and x not in (0, 1) and float(text) in (0, 1):
        decimals += 1
        text = f"{x:.{decimals}f}"
    return text


def sig(v: float, se: float | None = None, digits: int = 4, near: float | None = None) -> str:
    """v to `digits` significant digits (trailing zeros kept), and further to its standard error's second significant
    digit where that is finer, as is `near - v` when given (a correlation of 99.9998% shows as that, not 100.0%); the se
    rounded to the same place. Fixed point from 1e-3 to 1e6, else an exponent (the se then to 2 digits)."""
    if not math.isfinite(v):
        return num(v)
    se = se if se is not None and math.isfinite(se) and se > 0 else None
    if not v and not se:
        return "0"
    e = math.floor(math.log10(abs(v))) if v else 0
    last = e - digits + 1  # the power of ten of the last digit shown
    for fine in (se, None if near is None else abs(near - v)):
        if fine:
            last = min(last, math.floor(math.log10(fine)) - 1)
    if -3 <= e < 6 or not v:
        dec = max(0, -last)
        text = f"{round(v, -last) if last > 0 else v:.{dec}f}"
        return text + (f" ± {round(se, -last) if last > 0 else se:.{dec}f}" if se else "")
    return exponent(f"{v:.{e - last}e}" + (f" ± {se:.1e}" if se else ""))


def script_json(obj) -> str:
    """JSON to place inside <script type="application/json">: no '<', '>' or '&' can close the element."""
    text = json.dumps(records.json_safe(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for a, b in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(a, b)
    return text
