"""The shapes of what a run record's readers take from it: checked when a record is read (`records.read`), so that a
hand-edited or damaged run.json is an error naming the key, not a crash in whichever reader touched it first.

Each check returns the value it was given (`checked`): a record keeps what was written.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError, model_validator

Number = StrictFloat  # an int too; not a string ("1.5" or "inf" would pass as a float and fail later, in a format)


class _Numbers(BaseModel):
    """A dict of a record whose values beyond the typed fields are numbers (NaN, inf and null included). Only checks:
    the record keeps the dict itself (`checked`), so readers see what was written."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _extras_are_numbers(self):
        for key, value in (self.model_extra or {}).items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key!r} is {value!r}, not a number")
        return self


class _ConfidenceBin(_Numbers):
    p_top_lo: Number
    p_top_hi: Number
    positions: StrictInt
    kl_mean: Number | None
    flip_rate: Number | None


class _DepthBin(_Numbers):
    depth_lo: StrictInt
    depth_hi: StrictInt
    positions: StrictInt
    windows: StrictInt | None = None  # a record from 7d388cf (2026-12-07) has neither
    kl_mean: Number | None
    kl_mean_se: Number | None
    flip_rate: Number | None
    ln_ppl_ratio: Number | None
    ln_ppl_ratio_se: Number | None = None


Interval = tuple[Number | None, Number | None]


class Aggregates(_Numbers):
    """What every reader takes from a pair's aggregates; its other values are numbers too."""

    positions: StrictInt
    kl_mean: Number
    top1_agree: Number
    by_confidence: list[_ConfidenceBin] = []
    by_depth: list[_DepthBin] = []  # a record from before 2026-12-07: none
    kl_mean_ci95: Interval | None = None
    top1_agree_ci95: Interval | None = None


class PromptRow(_Numbers):
    prompt: str


class MatrixCell(_Numbers):
    a: str
    b: str
    top1_agree: Number | None
    sym_kl_mean: Number | None


class _TokensPrompt(BaseModel):
    id: str
    ids: list[int]
    texts: list[str]


class Tokens(BaseModel):
    """tokens.json: each prompt's ids and their texts, the text of every id shown (id as a string -> text)."""

    model_config = ConfigDict(extra="allow")
    prompts: list[_TokensPrompt]
    vocab: dict[str, str]


class _BenchRow(BaseModel):
    model_config = ConfigDict(extra="allow")
    rows_per_s: Number | None = None
    gbps: Number | None = None
    median_s: Number | None = None
    iqr_s: Number | None = None
    fraction_of_ceiling: Number | None = None
    speedup_vs_snippet: Number | None = None


class Throughput(BaseModel):
    model_config = ConfigDict(extra="allow")
    results: list[_BenchRow] = []
    notes: dict | None = None
    read_ceiling_gbps: Number | None = None
    copy_ceiling_gbps: Number | None = None


class _BadValue(ValueError):
    """The first wrong value inside a record's dict: its key below the dict, and why."""

    def __init__(self, key: str, why: str):
        super().__init__(f"{key}: {why}")
        self.key, self.why = key, why


def first_error(exc: ValidationError) -> tuple[str, str]:
    """The dotted key of a validation's first error, and its message, looking into checked()'s errors."""
    first = exc.errors()[0]
    loc, why = [str(x) for x in first["loc"]], first["msg"]
    inner = (first.get("ctx") or {}).get("error")
    if isinstance(inner, _BadValue):
        loc, why = [*loc, inner.key], inner.why
    return ".".join(x for x in loc if x), re.sub(r" or instance of \w+$", "", why.removeprefix("Value error, "))


def checked(model: type[BaseModel], value, where: str = ""):
    """`value` itself, once `model` accepts it; else a ValueError naming the first key that is wrong and why."""
    try:
        model.model_validate(value)
    except ValidationError as exc:
        key, why = first_error(exc)
        raise _BadValue(".".join(x for x in (where, key) if x), why) from None
    return value
