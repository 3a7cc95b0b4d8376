"""The report page's sections on the run itself rather than its statistics: the quantization gate's verdict
(gate.json beside the record), the softmax/filter throughput table (`harness bench --into RUN_DIR`), and the run,
machine, versions and models cards.

    harness report reports/latest && chromium reports/latest/index.html      # the sections at #gate, #throughput, #meta
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import records
from harness.check import ABSENT, VERSION_KEYS
from harness.html_format import esc, num


def throughput_section(record: records.RunRecord) -> str:
    t = record.throughput
    if not t:
        return ""
    write = f", write ceiling {num(t.get('write_ceiling_gbps'), '.1f')} GB/s" if "write_ceiling_gbps" in t else ""
    rows = [
        f"<h2 id=throughput>Softmax/filter throughput</h2><p>{esc(t.get('device'))} ({esc(t.get('device_name'))}): read ceiling "
        f"{num(t.get('read_ceiling_gbps'), '.1f')} GB/s, copy ceiling {num(t.get('copy_ceiling_gbps'), '.1f')} GB/s{write}. "
        "The ceilings are the best measured in the run; each case is also held against the read ceiling measured just "
        "before and after it (<i>near</i>), as a shared machine's memory runs in phases. <i>of ceiling</i>: logits bytes "
        "read per second over the near read ceiling; <i>of run</i>: the same over the run's; <i>of bound</i>: rows/s over "
        "what memory allows the case's reads and writes of its sparse form at the near ceilings. A fraction over 100% "
        "means the case ran in a faster memory phase than its near probes saw, or (of bound) that its output stayed in "
        "the cache between calls.</p>",
        "<div class=wide><table class=sortable id=bench><thead><tr><th data-type=text>impl</th><th>batch</th><th data-type=text>dtype</th>"
        "<th data-type=text>inputs</th><th data-type=text>filter</th><th>rows/s</th><th>GB/s</th><th>near GB/s</th>"
        "<th>of ceiling</th><th>of bound</th><th>of run</th><th>× snippet</th><th>spread</th></tr></thead><tbody>",
    ]
    for r in t.get("results", []):
        spread = r["iqr_s"] / r["median_s"] if r.get("iqr_s") is not None and r.get("median_s") else None
        rows.append(
            f"<tr><td>{esc(r.get('impl'))}</td><td data-v=\"{r.get('batch')}\">{esc(r.get('batch'))}</td><td>{esc(r.get('dtype'))}</td>"
            f"<td>{esc(r.get('inputs'))}</td><td>{esc(r.get('filter'))}</td>"
            f"<td data-v=\"{r.get('rows_per_s')}\">{num(r.get('rows_per_s'), ',.0f')}</td>"
            f"<td data-v=\"{r.get('gbps')}\">{num(r.get('gbps'), '.2f')}</td>"
            f"<td data-v=\"{r.get('near_read_gbps')}\">{num(r.get('near_read_gbps'), '.1f')}</td>"
            f"<td data-v=\"{r.get('fraction_of_ceiling')}\">{num(r.get('fraction_of_ceiling'), '.1%')}</td>"
            f"<td data-v=\"{r.get('fraction_of_bound')}\">{num(r.get('fraction_of_bound'), '.1%')}</td>"
            f"<td data-v=\"{r.get('fraction_of_run_ceiling')}\">{num(r.get('fraction_of_run_ceiling'), '.1%')}</td>"
            f"<td data-v=\"{r.get('speedup_vs_snippet')}\">{num(r.get('speedup_vs_snippet'), '.0f')}</td>"
            f"<td data-v=\"{spread}\">{num(spread, '.0%')}</td></tr>"
        )
    notes = [f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in (t.get("notes") or {}).items()]
    return ("".join(rows) + "</tbody></table></div><p class=small>rows/s × the row width is the logit tokens per second; spread: "
            "interquartile range over median.</p>" + (f"<ul class=small>{''.join(notes)}</ul>" if notes else ""))


def gate_section(run_dir: Path) -> str:
    """The verdict of `harness check` on this run (gate.json beside the record), when there is one."""
    path = run_dir / "gate.json"
    if not path.is_file():
        return ""
    try:
        return _gate_html(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:  # cut short, or edited by hand
        return (f"<h2 id=gate>Quantization gate</h2><p>{esc(path)} cannot be read ({esc(type(exc).__name__)}: {esc(exc)}), so "
                "its verdict is not shown; <code>harness check --run</code> on this run writes it again.</p>")


def _gate_html(v: dict) -> str:
    rows = v.get("breaches", []) + v.get("within_noise", []) + v.get("passed", [])
    passed, checks, fails = v.get("verdict") == "pass", esc(v.get("checks")), len(v.get("breaches", []))
    count = f"all {checks} checks pass" if passed else f"{fails} of {checks} checks fail"
    out = [f"<h2 id=gate>Quantization gate: <span class=\"verdict {'pass' if passed else 'fail'}\">{'PASS' if passed else 'FAIL'}</span></h2>"
           f"<p>{count}" + (f", against baseline {esc(v['baseline'])}" if v.get("baseline") else "") + ".</p>"]  # fmt: skip
    if rows:
        out.append("<div class=wide><table id=gate-table><tr><th>pair</th><th>metric</th><th>value</th><th>limit</th><th>baseline</th>"
                   "<th>rule</th><th>verdict</th></tr>")  # fmt: skip
        for b in rows:
            word = "pass" if b.get("passed") else "within noise" if b["within_noise"] else "FAIL"
            out.append(
                f"<tr><td>{esc(b['pair'])}</td><td>{esc(b['metric'])}</td><td>{'absent' if b['rule'] == ABSENT else num(b['value'], '.4g')}</td>"
                f"<td>{num(b['limit'], '.4g')}</td><td>{num(b.get('baseline'), '.4g')}</td><td>{esc(b['rule'])}</td>"
                f"<td class=\"verdict {'pass' if b.get('passed') else 'noise' if b['within_noise'] else 'fail'}\">{word}</td></tr>"
            )
        out.append("</table></div>")
    out += [f"<p class=small>warning: {esc(w)}</p>" for w in v.get("warnings", [])]
    return "".join(out)


def metadata_section(record: records.RunRecord) -> str:
    kv = lambda d: "".join(f"<tr><th>{esc(str(k).replace('_', ' '))}</th><td>{_value(v)}</td></tr>" for k, v in (d or {}).items())  # noqa: E731
    git = record.git or {}
    run = {"run id": record.run_id, "created (UTC)": record.created_at, "status": record.status, "seed": record.seed,
           "batch size": record.batch_size, "git commit": git.get("commit", "–"), "tree dirty": git.get("dirty", "–")}  # fmt: skip
    out = [
        "<h2 id=meta>Run</h2><div class=cards>",
        f"<div class=card><h3>run</h3><table class=kv>{kv(run)}</table></div>",
        f"<div class=card><h3>machine</h3><table class=kv>{kv(record.machine)}</table></div>",
        f"<div class=card><h3>versions</h3><table class=kv>{kv(record.versions)}</table></div></div>",
    ]
    config = f"<h3>resolved config</h3><pre>{esc(json.dumps(record.config, indent=2, default=str))}</pre>"
    if not record.variants:  # a failed run's record: the models' facts come with the finished run
        return "".join(out) + config
    out.append("<h3>models</h3><div class=wide><table id=models><tr><th>model</th><th>source</th><th>dtype</th><th>device</th>"
               "<th>loader (kernel)</th><th>parameters</th><th>load s</th><th>extract s</th><th>forward s</th><th>store</th></tr>")  # fmt: skip
    for name, v in record.variants.items():
        reused = v.get("reused_shards") == v.get("shards")
        by = f"its last part, {esc(v['first_part'])}," if v.get("first_part") else "filling it"
        filled = (v.get("filled_by") or {}).get("versions") or {}
        other = ", ".join(f"{k} {filled[k]}" for k in VERSION_KEYS if k in filled and filled[k] != record.versions.get(k))
        took = f" (store reused; {by} took {num(v.get('first_extract_s'), '.1f')}{'; filled with ' + esc(other) if other else ''})" if reused else ""
        out.append(
            f"<tr><td>{esc(name)}</td><td class=path>{esc(v.get('source'))}{'@' + esc(v['revision']) if v.get('revision') else ''}</td>"
            f"<td>{esc(v.get('dtype'))}</td><td>{esc(v.get('device'))}{_placed(v)}</td><td class=text>{_loader(v)}</td>"
            f"<td>{num(v.get('parameters'), ',')}</td><td>{'–' if reused and not v.get('load_s') else num(v.get('load_s'), '.1f')}</td>"
            f"<td>{num(v.get('extract_s'), '.1f')}{took}</td>"
            f"<td>{num(v.get('forward_s'), '.1f')}</td>"
            f"<td class='small path'>{esc(v.get('store'))}</td></tr>"
        )
    out.append(f"</table></div>{config}")
    return "".join(out)


def _value(v) -> str:
    """A record value for a key-value table: "–" for None, yes/no for booleans."""
    return "–" if v is None else ("yes" if v else "no") if isinstance(v, bool) else esc(v)


def _placed(v: dict) -> str:
    """Where a model's weights were, where that is not what its device says (a sharded model's GPUs, or the CPU)."""
    placed = v.get("placed_on")  # None in records from before it was kept
    return "" if not placed or placed in ([v.get("device")], [f"{v.get('device')}:0"]) else f" ({esc(', '.join(placed))})"


def _loader(v: dict) -> str:
    """A model's loader, the backend it was asked for, and the quantized kernels it ran (records before they were kept:
    transformers)."""
    text = esc(v.get("loader", "transformers")) + (f" ({esc(v['backend'])})" if v.get("backend") else "")
    return text + (f"<br><span class=small>{esc(', '.join(v['kernels']))}</span>" if v.get("kernels") else "")
