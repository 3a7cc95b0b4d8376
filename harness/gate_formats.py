"""The gate's verdict in the forms CI systems read, beside `gate.json` and the console table.

    harness check --config configs/ci-gate.yaml --junit gate.xml --markdown gate.md

- `--junit PATH`: JUnit XML (GitLab's `artifacts:reports:junit`, Jenkins' junit step, the test-report actions of
  GitHub), a test case per check: a breach is a failure, a check within noise passes with a note.
- `--markdown PATH`, and `gate.md` in the run folder: the verdict as a Markdown table, for a pull-request comment;
  appended to `$GITHUB_STEP_SUMMARY` where that is set (a GitHub Actions job's summary page).
- In GitHub Actions (`GITHUB_ACTIONS=true`), each breach and warning also as a workflow command (`::error ...`), which
  GitHub shows as an annotation on the run.

A gate that gives no verdict (a command-line or input error, a crash, an interruption: `no_verdict`) writes
each of them too, as one error naming why, so that no CI system shows an earlier run's file in its place.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ("pair", "metric", "value", "limit", "baseline", "rule", "verdict")
ABSENT = "present in this run"  # check.ABSENT (check imports this module)


def cells(b: dict) -> dict[str, str]:
    """One check of a verdict (a Breach as a dict) as the strings every form shows."""

    def num(x) -> str:
        return f"{x:.4g}" if x is not None and math.isfinite(x) else "–"

    return {
        "pair": b["pair"], "metric": b["metric"], "value": "absent" if b["rule"] == ABSENT else f"{b['value']:.4g}",
        "limit": num(b["limit"]), "baseline": num(b["baseline"]) if b["baseline"] is not None else "–", "rule": b["rule"],
        "verdict": "pass" if b.get("passed") else "within noise" if b["within_noise"] else "FAIL",
    }  # fmt: skip


def checks(verdict: dict) -> list[dict]:
    """Every check, failed ones first (a verdict from before `passed`: the others only)."""
    return verdict["breaches"] + verdict["within_noise"] + verdict.get("passed", [])


def headline(verdict: dict) -> str:
    fails = len(verdict["breaches"])
    word = f"{fails} of {verdict['checks']} checks fail" if fails else f"all {verdict['checks']} checks pass"
    return f"gate: {word} (run {verdict['run']})"


# ---------------------------------------------------------------- JUnit XML


_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # no XML 1.0 document may hold them


def _x(text) -> str:
    """Text for an XML attribute or element: characters XML cannot hold (a control character in a path or an error
    message) as \\xNN, so the file stays readable."""
    return _NOT_XML.sub(lambda m: f"\\x{ord(m[0]):02x}", str(text))


def _suite(name: str, cases: int, failures: int, errors: int, props: dict) -> tuple[ET.Element, ET.Element]:
    root = ET.Element("testsuites", name="harness check", tests=str(cases), failures=str(failures), errors=str(errors))
    suite = ET.SubElement(root, "testsuite", name=_x(name), tests=str(cases), failures=str(failures), errors=str(errors),
                          skipped="0", timestamp=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
    properties = ET.SubElement(suite, "properties")
    for key, value in props.items():
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=_x(value))
    return root, suite


def _xml(root: ET.Element) -> str:
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def junit(verdict: dict, line) -> str:
    """A test case per check, named "<metric> <rule>" in class "gate.<pair>" (the pair's dots as "_": Jenkins reads a
    class name's last dot as the end of its package); `line(b)` gives a check's one line."""
    rows = checks(verdict)
    root, suite = _suite(
        f"quantization gate (run {verdict['run']})", len(rows), len(verdict["breaches"]), 0,
        {"run": verdict["run"], "baseline": verdict.get("baseline"), "verdict": verdict["verdict"]},
    )  # fmt: skip
    for b in rows:
        c = cells(b)
        case = ET.SubElement(suite, "testcase", classname=_x("gate." + b["pair"].replace(".", "_")), name=_x(f"{b['metric']} {b['rule']}"), time="0")
        if c["verdict"] == "FAIL":
            failure = ET.SubElement(case, "failure", message=_x(line(b)), type="regression")
            failure.text = _x("  ".join(f"{k}: {c[k]}" for k in COLUMNS[2:6]))
        elif c["verdict"] == "within noise":
            ET.SubElement(case, "system-out").text = _x(line(b))  # its band: "within noise (± 0.00026, paired by prompt)"
    if verdict["warnings"]:
        ET.SubElement(suite, "system-err").text = _x("\n".join(f"warning: {w}" for w in verdict["warnings"]))
    return _xml(root)


def junit_error(message: str, kind: str, detail: str | None = None) -> str:
    """The report of a gate that gave no verdict (exit 2, 3, 130 or 143): one test case with the error (and `detail`,
    a crash's traceback)."""
    root, suite = _suite("quantization gate", 1, 0, 1, {"verdict": "error"})
    case = ET.SubElement(suite, "testcase", classname="gate", name="harness check", time="0")
    error = ET.SubElement(case, "error", message=_x(message.splitlines()[0] if message else kind), type=_x(kind))
    error.text = _x(message + (f"\n\n{detail}" if detail else ""))
    return _xml(root)


# ---------------------------------------------------------------- Markdown and GitHub Actions


def _md(text: str) -> str:
    """Text in a table cell or list item: HTML's & < > as entities (GitHub renders HTML in Markdown), pipes escaped,
    line breaks as spaces."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"\r\n?|\n", " ", text.replace("\\", "\\\\").replace("|", "\\|"))


def markdown(verdict: dict) -> str:
    rows = checks(verdict)
    word = "FAIL" if verdict["verdict"] == "fail" else "PASS"
    lines = [f"### Quantization gate: {word}", "", f"{headline(verdict).removeprefix('gate: ')}"
             + (f", against baseline run {verdict['baseline']}" if verdict.get("baseline") else ""), ""]  # fmt: skip
    if rows:
        lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * 2 + "---:|" * 3 + "---|---|"]
        for b in rows:
            c = cells(b)
            c["verdict"] = {"FAIL": "**FAIL**"}.get(c["verdict"], c["verdict"])
            lines.append("| " + " | ".join(_md(c[k]) for k in COLUMNS) + " |")
    if verdict["warnings"]:
        lines += ["", "Warnings:", ""] + [f"- {_md(w)}" for w in verdict["warnings"]]
    return "\n".join(lines) + "\n"


def markdown_error(message: str, kind: str) -> str:
    fence = "`" * max(3, 1 + max((len(r) for r in re.findall(r"`+", message)), default=0))  # longer than any run inside
    return f"### Quantization gate: ERROR\n\n`harness check` gave no verdict ({kind}):\n\n{fence}\n{message}\n{fence}\n"


def _escape(text: str, prop: bool = False) -> str:
    """A workflow command's message (or property) escaped as GitHub's toolkit does."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    return text.replace(":", "%3A").replace(",", "%2C") if prop else text


def annotations(verdict: dict, line) -> list[str]:
    out = []
    for b in verdict["breaches"]:
        title = _escape("gate: " + b["pair"] + " " + b["metric"], prop=True)
        out.append(f"::error title={title}::{_escape(line(b))}")
    return out + [f"::warning title=gate::{_escape(w)}" for w in verdict["warnings"]]


def error_annotation(message: str, kind: str) -> str:
    return f"::error title={_escape('harness check: ' + kind, prop=True)}::{_escape(message)}"


def in_github_actions() -> bool:
    return os.environ.get("GITHUB_ACTIONS") == "true"


def append_step_summary(text: str) -> str | None:
    """Appends to $GITHUB_STEP_SUMMARY where it is set; a warning where it cannot be written (the verdict stands)."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return None
    try:
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
            f.write(text + "\n")
    except OSError as exc:
        return f"GITHUB_STEP_SUMMARY {path} not written: {exc.strerror or exc}"
    return None


def check_writable(path: Path | None, flag: str) -> None:
    """GateError where `flag`'s file cannot be written (its folder is made): before the gate runs, not after."""
    if path is None:
        return
    from harness.gate_checks import GateError

    path = Path(path)
    if path.is_dir():
        raise GateError(f"{flag} {path} is a folder: give the path of a file")
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise GateError(f"{flag} {path}: {folder} is a file, not a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GateError(f"{flag} {path}: its folder cannot be made: {exc.strerror or exc}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GateError(f"{flag} {path} cannot be written (no permission)")


def write(path: Path, text: str) -> None:
    """UTF-8; a character it cannot hold (a path's undecodable byte, kept by Python as a surrogate) as \\xNN."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", errors="backslashreplace")


def _flag(argv: list[str], flag: str) -> Path | None:
    """The path given to `flag` in a command line that may not parse as a whole (None where it has none)."""
    import argparse

    one = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    one.add_argument(flag, type=Path)
    try:
        return getattr(one.parse_known_args(argv)[0], flag.lstrip("-"))
    except (argparse.ArgumentError, SystemExit):  # "--junit" without its path: nowhere to write
        return None


def no_verdict(argv: list[str], message: str, kind: str, detail: str | None = None) -> None:
    """`harness check ARGV` ended without a verdict (exit 2, 3, 130 or 143): its --junit and --markdown files, the
    step summary and (in GitHub Actions) an annotation say why, `kind` which (e.g. "input error, exit 2"), with
    `detail` (a traceback) in the JUnit file. Best effort: nothing here may change the exit code in flight."""
    junit, markdown, text = _flag(argv, "--junit"), _flag(argv, "--markdown"), markdown_error(message, kind)
    for path, content in ((junit, lambda: junit_error(message, kind, detail)), (markdown, lambda: text)):
        if path is not None:
            try:
                write(path, content())
            except (OSError, ValueError):  # the error in flight is the one to report
                pass
    try:
        append_step_summary(text)
        if in_github_actions():
            print(error_annotation(message, kind), flush=True)
    except (OSError, ValueError):  # a closed stdout (`| head`), say
        pass
