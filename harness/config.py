"""One comparison = one YAML file, validated on load; `key.sub=value` overrides from the command line.

    python -m harness.config configs/default.yaml batch_size=4     # prints the resolved config

An unknown key, a wrong type or a missing file is a `ConfigError` that names the file and the key.
Override values are parsed as YAML (`variants.0.dtype=bfloat16`, `seed=3`), never split by hand.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config problem, worded for the person who wrote the file."""


class _UniqueKeys(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error, not the last one silently winning."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden, as YAML allows
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:  # an unhashable key: the parent class reports it as a YAML error
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml(text: str):
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 (a SafeLoader)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    name: str = Field(min_length=1, max_length=100)
    source: str = Field(min_length=1)  # "zoo:NAME", a local folder, or a hub id
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"  # "auto": CUDA when present, else CPU; "sharded": over every visible GPU (device_map="auto")
    trust_remote_code: bool = False
    # what loads the weights (loaders.LOADERS): transformers' AutoModelForCausalLM (a GPTQ checkpoint through optimum +
    # gptqmodel, with the kernel it picks), or gptqmodel's own GPTQModel.load (quantized checkpoints only), whose
    # kernel `backend` may name (gptqmodel's BACKEND values: gptq_torch, gptq_torch_fused, gptq_marlin, ...)
    loader: Literal["transformers", "gptqmodel"] = "transformers"
    backend: str | None = None

    @model_validator(mode="after")
    def _backend_needs_gptqmodel(self) -> ModelSpec:
        if self.backend is not None and self.loader != "gptqmodel":
            raise ValueError(f"model {self.name!r}: backend {self.backend!r} chooses a kernel of gptqmodel's loader; "
                             "add loader: gptqmodel (transformers' loader picks its own)")  # fmt: skip
        return self

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda|cuda:\d+|sharded", device):
            raise ValueError("a device is auto (CUDA when present, else the CPU), cpu, cuda, cuda:N (one GPU) or "
                             "sharded (the model's layers spread over every visible GPU, by accelerate's "
                             "device_map='auto')")  # fmt: skip
        return device

    @field_validator("name")
    @classmethod
    def _file_safe(cls, name: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise ValueError("a model's name is part of report file names (positions-NAME.npz): letters, digits and "
                             ". _ + - only, starting with a letter or digit")  # fmt: skip
        return name


class TextMode(_Strict):
    context: int = Field(default=512, ge=2)  # tokens per window (at most the model's context)
    score: Literal["all", "second_half", "llama_cpp"] = "all"

    @model_validator(mode="after")
    def _llama_cpp_scores_something(self) -> TextMode:
        # llama_cpp scores a window's second half but its first token (context - 1 > context // 2): none of 2 tokens
        if self.score == "llama_cpp" and self.context < 3:
            raise ValueError(f"text.score 'llama_cpp' scores the second half of each window (less its first token), "
                             f"which a window of {self.context} tokens does not have: it needs text.context >= 3")  # fmt: skip
        return self


class GenerateMode(_Strict):
    max_new_tokens: int = Field(default=32, ge=1)  # greedy tokens the reference adds to each prompt


class Metrics(_Strict):
    top_k: list[Annotated[int, Field(ge=1, le=256)]] = Field(default=[5, 10], min_length=1)  # top-k overlaps to report
    bootstrap_resamples: int = Field(default=1000, ge=0)  # 0: no bootstrap intervals
    matrix: bool = True  # top-1 agreement and symmetric KL between every pair of models
    smoothing_eps: float | None = Field(default=None, gt=0, lt=1)  # also report KL(p ‖ (1−ε)q + ε/V) where KL is +inf (and the reverse)

    @field_validator("top_k")
    @classmethod
    def _distinct(cls, ks: list[int]) -> list[int]:
        if len(set(ks)) != len(ks):
            raise ValueError("each k once")
        return ks


class Limit(_Strict):
    """Bounds on one aggregate of one pair (`harness check`); give at least one."""

    # finite numbers: an infinite bound passes everything, and the run record (JSON) would keep it as null
    min: float | None = Field(default=None, allow_inf_nan=False)  # fail below
    max: float | None = Field(default=None, allow_inf_nan=False)  # fail above
    max_x_floor: float | None = Field(default=None, gt=0, allow_inf_nan=False)  # fail above this multiple of the noise-floor pair's value

    @model_validator(mode="after")
    def _some_bound(self) -> Limit:
        if self.min is None and self.max is None and self.max_x_floor is None:
            raise ValueError("a limit needs at least one of min, max, max_x_floor")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max}): no value could pass")
        return self


class Config(_Strict):
    name: str
    zoo_profile: Literal["full", "micro"] = "full"  # which build of the embedded family `zoo:` means
    reference: ModelSpec
    variants: list[ModelSpec] = Field(min_length=1)
    prompts: Path  # JSONL, relative to the config file
    mode: Literal["text", "generate"] = "text"
    text: TextMode = TextMode()  # mode "text": every next-token position, in windows
    generate: GenerateMode = GenerateMode()  # mode "generate": the reference's greedy continuation
    batch_size: int = Field(default=8, ge=1)  # sequences per forward pass
    padding_side: Literal["right", "left"] = "right"
    store_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    # a variant whose tokenizer gives other ids: an error, or (true) scored on its own tokens of the same text, at the
    # positions where both tokenizations start a token at the same byte, over the tokens both vocabularies share
    cross_vocab: bool = False
    metrics: Metrics = Metrics()
    noise_floor: str | None = None  # a variant whose drift from the reference is the noise floor
    # `harness check`: candidate name (or "*", every pair) -> aggregate name (kl_mean, top1_agree, ...) -> limits
    gate: dict[str, dict[str, Limit]] = {}
    seed: int = Field(default=0, ge=0)  # of the bootstrap (numpy's generators take non-negative seeds)
    reports_dir: Path = Path("reports")
    source_file: Path | None = None  # where this config was read from (set by `load`)

    @field_validator("variants")
    @classmethod
    def _unique_names(cls, variants: list[ModelSpec]) -> list[ModelSpec]:
        names = [v.name for v in variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {dupes}")
        return variants

    @model_validator(mode="after")
    def _floor_is_a_variant(self) -> Config:
        names = {v.name for v in self.variants}
        if self.reference.name in names:  # its store and its pair would be the variant's: a run of it against itself
            raise ValueError(f"variant name {self.reference.name!r} is the reference's name; give the variant another")
        listed = [v.name for v in self.variants]

        def which(name: str) -> str:
            near = difflib.get_close_matches(name, listed, n=1)
            return (f" (did you mean {near[0]!r}?)" if near else "") + f"; the variants are: {', '.join(listed)}"

        if self.noise_floor is not None and self.noise_floor not in names:
            raise ValueError(f"noise_floor {self.noise_floor!r} is not the name of a variant{which(self.noise_floor)}")
        known = None
        for pair, limits in self.gate.items():
            if pair != "*" and pair not in names:
                raise ValueError(f"gate key {pair!r} is not the name of a variant (nor '*', every variant){which(pair)}")
            if self.noise_floor is None and any(lim.max_x_floor is not None for lim in limits.values()):
                raise ValueError(f"gate.{pair} uses max_x_floor, but no noise_floor is set")
            known = known or gate_metrics(self.metrics.top_k, self.noise_floor is not None, self.cross_vocab)
            for metric in limits:
                if metric not in known:
                    from harness.align import AGGREGATES

                    if metric in AGGREGATES:
                        raise ValueError(f"gate.{pair}.{metric}: only a pair of two vocabularies has {metric} (a variant "
                                         "with another tokenizer, compared over the tokens both share): set cross_vocab: true (or "
                                         "cross_vocab=true on the command line)")  # fmt: skip
                    if metric == "kl_floor_multiple":
                        raise ValueError(f"gate.{pair}.kl_floor_multiple is the mean KL over the noise floor's, and no "
                                         "noise_floor is set: name the variant that is the floor (noise_floor: NAME)")  # fmt: skip
                    near = difflib.get_close_matches(metric, known, n=3)
                    hint = f"did you mean {', '.join(near)}?" if near else f"the metrics are: {', '.join(known)}"
                    raise ValueError(f"gate.{pair}.{metric}: no pair aggregate is called {metric!r}; {hint}")
        return self

    @property
    def warnings(self) -> list[str]:
        if self.store_dtype == "bfloat16":
            return [
                "store_dtype bfloat16 keeps 8 bits of mantissa: log-probs lose ~0.4% each, which swamps a "
                "KL below ~1e-3 nats (5 to 40 times the error of float16); use float16 or float32 for quantized variants"
            ]
        return []

    @property
    def models(self) -> list[ModelSpec]:
        return [self.reference, *self.variants]


def gate_metrics(top_k: list[int], floor: bool, cross_vocab: bool = False) -> list[str]:
    """The names `gate` limits may take: every scalar of a pair's aggregates, as `aggregate.pair_aggregates` makes
    them for these top-k sizes (from a few made-up positions, so that the list cannot drift from what a run has),
    and with cross_vocab those that only a pair of two vocabularies has (align.AGGREGATES, bits per byte etc.)."""
    import numpy as np

    from harness import aggregate

    rng = np.random.default_rng(0)
    n = 6
    m = {k: rng.random(n) for k in ("kl", "kl_rev", "js", "tv", "kl_smoothed", "kl_rev_smoothed", "delta_p", "delta_p_top", "nll_ref",
                                    "nll_cand", "entropy_ref", "entropy_cand", "p_top_ref", "margin_ref")}  # fmt: skip
    m |= {f"top{k}_overlap": rng.random(n) for k in top_k}
    m |= {"top1_agree": rng.random(n) < 0.5, "ref_top_rank": rng.integers(0, 3, n)}
    agg = aggregate.pair_aggregates(m, np.arange(n) % 3, ks=top_k, resamples=0, seed=0)
    names = [k for k, v in agg.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if cross_vocab:
        from harness import align

        names += list(align.AGGREGATES)
    return sorted(names + (["kl_floor_multiple"] if floor else []))


def apply_override(data: dict, assignment: str, origin: str) -> None:
    """Sets `a.b.0.c=value` in the raw mapping; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r}: expected KEY=VALUE, such as batch_size=4")
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"override {assignment!r}: {where} is not an index of a {len(node)}-item list in {origin}")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {'.'.join(parts[:i])} is not a mapping in {origin}")
        if last:
            try:
                node[part] = _yaml(raw)
            except yaml.YAMLError as exc:
                raise ConfigError(f"override {assignment!r}: its value is not valid YAML: {exc}") from None
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model whose keys are valid at `loc` (a key's path, its last part left out): Config's fields, a list's
    items and a mapping's values followed down; None where the path leaves the models."""
    node = Config
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            node = field.annotation
        elif typing.get_origin(node) in (list, dict):
            node = typing.get_args(node)[-1]  # an item of the list, or a value of the mapping
        else:
            return None
    return node if isinstance(node, type) and issubclass(node, BaseModel) else None


def _unknown(loc: tuple) -> str:
    """An unknown key's message: the keys valid in its place, and the closest of them."""
    key = ".".join(str(p) for p in loc)
    model = _model_at(loc[:-1])
    if model is None:
        return f"unknown key '{key}'"
    known = [k for k in model.model_fields if k != "source_file"]  # (set by `load`, not by the file)
    near = difflib.get_close_matches(str(loc[-1]), known, n=1)
    where = f"keys of '{'.'.join(str(p) for p in loc[:-1])}'" if len(loc) > 1 else "top-level keys"
    return f"unknown key '{key}'" + (f" (did you mean '{near[0]}'?)" if near else "") + f"; the {where} are: {', '.join(known)}"


def _describe(error: ValidationError, origin: str, overridden: dict[str, str] | None = None) -> str:
    """A validation error in one paragraph, each key named; a key set (or under one set) by a command-line override
    says so, with the override."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        by = next((a for k, a in (overridden or {}).items() if key == k or key.startswith(k + ".")), None)
        src = "" if by is None else f" (from the override {by!r})"
        if item["type"] == "extra_forbidden":
            lines.append(_unknown(tuple(item["loc"])) + src)
        elif not item["loc"]:  # a check across keys: its message names them (the input is the whole file)
            msg = item["msg"].removeprefix("Value error, ")
            by = next((a for k, a in (overridden or {}).items() if all(part in msg for part in k.split("."))), None)
            lines.append(msg + ("" if by is None else f" (from the override {by!r})"))
        elif item["type"] == "missing":
            lines.append(f"missing key '{key}'")
        else:
            lines.append(f"key '{key}'{src}: {item['msg'].removeprefix('Value error, ')} (got {item.get('input')!r})")
    text = f"{origin}: " + "; ".join(lines)
    return text if text.endswith(("?", ".")) else text + "."


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        data = _yaml(path.read_text(encoding="utf-8-sig")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of keys, not {type(data).__name__}")
    for assignment in overrides:
        apply_override(data, assignment, str(path))
    data["source_file"] = str(path)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, str(path), {a.partition("=")[0]: a for a in overrides})) from None
    prompts = config.prompts if config.prompts.is_absolute() else path.parent / config.prompts
    if not prompts.is_file():
        what = "is a folder, not a file" if prompts.is_dir() else "does not exist"
        raise ConfigError(f"{path}: key 'prompts': prompt file {prompts} {what}")
    return config.model_copy(update={"prompts": prompts})


if __name__ == "__main__":
    from harness import script

    path, *overrides = script.args(__doc__, 1, 1000)
    print(yaml.safe_dump(load(path, overrides).model_dump(mode="json"), sort_keys=False))
