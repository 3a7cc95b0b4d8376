"""The run, stage by stage: config -> prompts -> segments -> extract every model -> compare.

    harness extract --config configs/default.yaml      # fills the stores only
    harness compare --config configs/default.yaml      # extract (or reuse), compare, report

Models load one at a time and are released before the next; only stores cross between stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness import align, extract, greedy, loaders, prompts
from harness.config import Config
from harness.prompts import Segment, TokenizedPrompts
from harness.store import Store


@dataclass(frozen=True)
class Plan:
    tokens: TokenizedPrompts  # the reference tokenizer's ids of every prompt
    segments: list[Segment]  # what every model is run on, in order
    loaded: dict[str, loaders.Loaded]  # model name -> where its weights are
    tokenizer: object  # the reference's tokenizer (loading a 151k-token one again takes ~1 s)
    # cross_vocab: model name -> its own reading of the prompts (ids, segments), for each variant whose tokenizer
    # differs from the reference's; and the alignment view (ids, vocab keys) of those and of the reference
    own: dict[str, tuple[TokenizedPrompts, list[Segment]]] = field(default_factory=dict)
    sides: dict[str, align.Side] = field(default_factory=dict)
    generations: Path | None = None  # generate mode: the reference's cached greedy continuations

    @property
    def positions(self) -> int:
        return sum(s.rows for s in self.segments)

    def model_tokens(self, name: str) -> tuple[TokenizedPrompts, list[Segment]]:
        """What model `name` is run on: its own tokens under cross_vocab, else the reference's."""
        return self.own.get(name, (self.tokens, self.segments))


def plan(cfg: Config, log=print, part: tuple[int, int] | None = None, wait_s: float = greedy.WAIT_S) -> Plan:
    """Tokenizes once with the reference, checks every variant's tokenizer, and cuts the segments. Generate mode with
    `part` (extract --part): the reference generates that part of the prompts and waits for the other parts'
    continuations (greedy.greedy_continuations)."""
    for warning in cfg.warnings:
        log(f"warning: {warning}")
    ref = loaders.locate(cfg.reference, cfg.zoo_profile)
    ref_tok = loaders.load_tokenizer(ref)
    tokenizers = {loaders.tokenizer_key(ref): ref_tok}  # a 151k-token tokenizer takes ~1 s to load: once per distinct one
    context = loaders.context_length(ref)
    generate = cfg.mode == "generate"
    if generate:
        limit = context - cfg.generate.max_new_tokens  # prompt + continuation must fit the context
        if limit < 2:
            raise prompts.PromptError(
                f"{cfg.source_file}: key 'generate.max_new_tokens' is {cfg.generate.max_new_tokens}, and the reference "
                f"{cfg.reference.name!r} has a context of {context} positions: prompt and continuation must fit it together"
            )
    else:
        if cfg.text.context > context:
            raise prompts.PromptError(
                f"{cfg.source_file}: key 'text.context' is {cfg.text.context}, more than the "
                f"{context} positions of the reference {cfg.reference.name!r}"
            )
        limit = None  # long texts are cut into windows
    source = cfg.reference.name + (f": {context} less generate.max_new_tokens {cfg.generate.max_new_tokens}" if generate else "")
    tokens = prompts.tokenize(ref_tok, prompts.load(cfg.prompts), max_length=limit, source=source, generation_prompt=generate)
    loaded = {cfg.reference.name: ref}
    cross = {}  # cross_vocab: variant name -> tokenizer key, for each that reads the prompts its own way
    for spec in cfg.variants:
        loaded[spec.name] = loaders.locate(spec, cfg.zoo_profile)
        key = loaders.tokenizer_key(loaded[spec.name])
        if key not in tokenizers:
            tokenizers[key] = loaders.load_tokenizer(loaded[spec.name])
        try:
            prompts.check_same_ids(tokens, ref_tok, tokenizers[key], spec.name, generation_prompt=generate)
        except prompts.PromptError as exc:
            if not cfg.cross_vocab:
                raise prompts.PromptError(f"{exc}. To compare it over the tokens both vocabularies share, at the "
                                          f"positions both tokenizations share, set cross_vocab: true (in {cfg.source_file}, or cross_vocab=true on the command line)") from None  # fmt: skip
            cross[spec.name] = key
    for warning in slow_half_precision(cfg, loaded):
        log(f"warning: {warning}")
    continuations, segments = None, None
    if generate:
        continuations = greedy.greedy_continuations(ref, tokens, cfg.generate.max_new_tokens, log=log, part=part, wait_s=wait_s)
        segments = prompts.generate_segments(tokens, continuations)
    segments, own, sides = _cross_readings(cfg, tokens, segments, continuations, cross, tokenizers, ref_tok)
    for spec in cfg.variants:  # a variant with a shorter context than the reference cannot take the segments
        longest = max((len(s.ids) for s in own.get(spec.name, (None, segments))[1]), default=0)
        if (limit := loaders.context_length(loaded[spec.name])) < longest:
            raise prompts.PromptError(
                f"variant {spec.name!r} has a context of {limit} positions, but the run feeds it {longest} tokens "
                f"at once; " + (f"lower 'generate.max_new_tokens' or shorten the prompts (in {cfg.source_file})" if generate else
                                f"lower 'text.context' in {cfg.source_file}")
            )
    generations = greedy.generations_path(ref, tokens, cfg.generate.max_new_tokens) if generate else None
    return Plan(tokens=tokens, segments=segments, loaded=loaded, tokenizer=ref_tok, own=own, sides=sides, generations=generations)


# CPU flags that give torch fast matmuls in each half-precision dtype (oneDNN); without them it emulates
HALF_FLAGS = {"bfloat16": ("avx512_bf16", "amx_bf16"), "float16": ("avx512_fp16", "amx_fp16")}
BIG = 100_000_000  # parameters from which the warning is worth its line (where the size is unknown: warned)


def slow_half_precision(
    cfg: Config, loaded: dict[str, loaders.Loaded], cpuinfo: str = "/proc/cpuinfo", size_of=loaders.size_estimate
) -> list[str]:
    """A warning per half-precision dtype that runs on a CPU without its matmul instructions: there a 0.5B model's
    forward pass took 10x (bfloat16) to 20x (float16) as long as in float32 (a review of 2026-12-06, 24-layer model)."""
    try:
        with open(cpuinfo) as f:
            flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):  # not Linux: nothing known
        return []
    slow = {}
    for spec in cfg.models:
        if spec.dtype not in HALF_FLAGS or loaded[spec.name].device != "cpu" or flags & set(HALF_FLAGS[spec.dtype]):
            continue
        if spec.source.startswith("zoo:") or (size_of(loaded[spec.name]) or BIG) < BIG:  # small: seconds either way
            continue
        slow.setdefault(spec.dtype, []).append(spec.name)
    return [f"{', '.join(names)} run{'s' if len(names) == 1 else ''} in {dtype} on a CPU without {' or '.join(HALF_FLAGS[dtype])}: "
            f"its matmuls are emulated, 10-50x slower than float32 at 0.5B parameters (GPTQ kernels in float16 the "
            f"slowest). For a {dtype} checkpoint (or a GPTQ one), "
            "dtype float32 holds the same weights exactly (the rows then differ from a "
            f"{dtype} deployment's by float32's rounding, not {dtype}'s)" for dtype, names in slow.items()]


def _cross_readings(
    cfg: Config, tokens: TokenizedPrompts, segments: list[Segment] | None, continuations, cross: dict, tokenizers: dict, ref_tok
) -> tuple[list[Segment], dict, dict]:  # fmt: skip
    """cross_vocab: each variant in `cross` (name -> tokenizer key in `tokenizers`) reads the same text its own way.
    Returns the reference's segments (generate mode: `segments`; text mode: cut here), Plan.own and Plan.sides.
    Text mode: the reference's windows start only at bytes where every reading starts a token (align.window_starts),
    and each variant's windows are the same bytes in its own tokens (align.own_windows), so at every aligned position
    both models have read the same text. Generate mode: the prompt, then the reference's continuation token by token
    (align.continued), the continuation scored."""
    text = continuations is None
    if not cross:
        return (prompts.text_segments(tokens, context=cfg.text.context, score=cfg.text.score) if text else segments), {}, {}
    ref_keys = align.vocab_keys(ref_tok)
    whole = tokens.ids if text else tuple(ids + tuple(c) for ids, c in zip(tokens.ids, continuations, strict=True))
    own, sides = {}, {cfg.reference.name: align.Side(whole, ref_keys)}
    keys = {key: align.vocab_keys(tokenizers[key]) for key in set(cross.values())}  # once per distinct tokenizer
    for name, key in cross.items():
        tok = tokenizers[key]
        if text:
            read = prompts.retokenize(tokens, ref_tok, tok)
            own[name] = (read, [])  # its windows follow the reference's, below
        else:
            index = align.reading_index(tok, keys[key])
            readings = [
                align.continued(prompts.render(ref_tok, prompt, generation_prompt=True), [ref_keys[i] for i in c], tok, keys[key], index)
                for prompt, c in zip(tokens.prompts, continuations, strict=True)
            ]
            read = prompts.TokenizedPrompts(prompts=tokens.prompts, ids=tuple(ids for ids, _ in readings), n_vocab=len(tok))
            own[name] = (read, [prompts.Segment(p, 0, ids, first - 1) for p, (ids, first) in enumerate(readings) if first < len(ids)])
        sides[name] = align.Side(read.ids, keys[key])
    if text:
        ref_name, names = cfg.reference.name, [p.id for p in tokens.prompts]
        distinct = list({sides[name].fingerprint: name for name in cross}.values())  # one variant per reading
        starts = align.window_starts(sides[ref_name], [sides[name] for name in distinct], names, [ref_name, *distinct])
        segments = prompts.text_segments(tokens, context=cfg.text.context, score=cfg.text.score, starts=starts)
        for name in cross:
            own[name] = (own[name][0], align.own_windows(segments, sides[ref_name], sides[name], names, (ref_name, name)))
    return segments, own, sides


def alignment(the_plan: Plan, a: str, b: str, stores: dict[str, Store], names: list[str]) -> align.PairAlignment | None:
    """How the stores of models a and b line up where their tokenizers differ (cross_vocab); None where they share
    the reference's reading, row for row."""
    if a not in the_plan.sides and b not in the_plan.sides:
        return None
    ref = next(iter(the_plan.sides.values()))  # the reference's: plan() puts it first
    side_a, side_b = the_plan.sides.get(a, ref), the_plan.sides.get(b, ref)
    if side_a.fingerprint == side_b.fingerprint:  # two variants with one tokenizer
        return None
    return align.align_stores(side_a, side_b, stores[a], stores[b], names, (a, b))


def extract_all(cfg: Config, the_plan: Plan, log=print, part: tuple[int, int] | None = None) -> tuple[dict[str, Store], dict[str, dict]]:
    """Every model's store, model by model; `part` (k, n): only that part of each store's missing shards."""
    stores, facts = {}, {}
    ids = tuple(p.id for p in the_plan.tokens.prompts)
    for spec in cfg.models:
        loaded = the_plan.loaded[spec.name]
        tokens, segments = the_plan.model_tokens(spec.name)
        stores[spec.name], facts[spec.name] = extract.extract(
            loaded, segments, tokens.n_vocab, batch_size=cfg.batch_size,
            store_dtype=cfg.store_dtype, padding_side=cfg.padding_side, prompt_ids=ids, part=part, log=log,
        )  # fmt: skip
        # fingerprint: the weights measured (a hub id's resolved commit, a zoo build's manifest, a folder's files)
        facts[spec.name] |= {"source": spec.source, "revision": spec.revision, "path": loaded.path, "dtype": spec.dtype,
                             "device": loaded.device, "loader": spec.loader, "backend": spec.backend,
                             "fingerprint": loaded.fingerprint}  # fmt: skip
        if spec.name in the_plan.own:
            facts[spec.name]["cross_vocab"] = {"positions": sum(s.rows for s in segments), "token_ids_sha256": tokens.fingerprint}
    return stores, facts
