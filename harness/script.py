"""The arguments of the modules' own entry points (`python -m harness.records RUN_DIR`, ...): their usage is the
docstring's `python -m` lines, shown on -h/--help; a flag they do not take, or a wrong count, is a usage error
(exit 2), not a path (`python -m harness.qwen_tokenizer --help` wrote a folder named --help)."""

from __future__ import annotations

import sys


def args(doc: str | None, least: int, most: int) -> list[str]:
    """sys.argv[1:], once it holds `least` to `most` arguments, none of them a flag."""
    usage = "\n".join(line.strip() for line in (doc or "").splitlines() if line.strip().startswith("python -m"))
    given = sys.argv[1:]
    if any(a in ("-h", "--help") for a in given):
        print(f"usage:\n  {usage}" if usage else "usage: see the module's docstring")
        raise SystemExit(0)
    flags = [a for a in given if a.startswith("-") and a != "-"]
    if flags or not least <= len(given) <= most:
        why = f"unknown option {flags[0]}" if flags else f"{len(given)} arguments given, it takes {least}" + (f" to {most}" if most > least else "")
        print(f"error: {why}\nusage:\n  {usage}", file=sys.stderr)
        raise SystemExit(2)
    return given
