"""The run, stage by stage: config -> prompts -> segments -> extract every model -> compare.

    harness extract --config configs/default.yaml      # fills the stores only
    harness compare --config configs/default.yaml      # extract (or reuse), compare, report

Models load one at a time and are released before the next; only stores cross between stages.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness import extract, loaders, prompts
from harness.config import Config
from harness.prompts import Segment, TokenizedPrompts
from harness.store import Store


@dataclass(frozen=True)
class Plan:
    tokens: TokenizedPrompts  # the reference tokenizer's ids of every prompt
    segments: list[Segment]  # what every model is run on, in order
    loaded: dict[str, loaders.Loaded]  # model name -> where its weights are
    tokenizer: object  # the reference's tokenizer (loading a 151k-token one again takes ~1 s)

    @property
    def positions(self) -> int:
        return sum(s.rows for s in self.segments)


def plan(cfg: Config, log=print) -> Plan:
    """Tokenizes once with the reference, checks every variant's tokenizer, and cuts the segments."""
    for warning in cfg.warnings:
        log(f"warning: {warning}")
    ref = loaders.locate(cfg.reference, cfg.zoo_profile)
    ref_tok = loaders.load_tokenizer(ref)
    tokenizers = {loaders.tokenizer_key(ref): ref_tok}  # a 151k-token tokenizer takes ~1 s to load: once per distinct one
    context = loaders.context_length(ref)
    generate = cfg.mode == "generate"
    if generate:
        limit = context - cfg.generate.max_new_tokens  # prompt + continuation must fit the context
    else:
        if cfg.text.context > context:
            raise prompts.PromptError(
                f"{cfg.source_file}: key 'text.context' is {cfg.text.context}, more than the "
                f"{context} positions of the reference {cfg.reference.name!r}"
            )
        limit = None  # long texts are cut into windows
    tokens = prompts.tokenize(
        ref_tok, prompts.load(cfg.prompts), max_length=limit, source=cfg.reference.name, generation_prompt=generate
    )
    loaded = {cfg.reference.name: ref}
    for spec in cfg.variants:
        loaded[spec.name] = loaders.locate(spec, cfg.zoo_profile)
        key = loaders.tokenizer_key(loaded[spec.name])
        if key not in tokenizers:
            tokenizers[key] = loaders.load_tokenizer(loaded[spec.name])
        prompts.check_same_ids(tokens, tokenizers[key], spec.name, generation_prompt=generate)
    if generate:
        continuations = extract.greedy_continuations(ref, tokens, cfg.generate.max_new_tokens, log=log)
        segments = prompts.generate_segments(tokens, continuations)
    else:
        segments = prompts.text_segments(tokens, context=cfg.text.context, score=cfg.text.score)
    longest = max(len(s.ids) for s in segments)
    for spec in cfg.variants:  # a variant with a shorter context than the reference cannot take the segments
        if (limit := loaders.context_length(loaded[spec.name])) < longest:
            raise prompts.PromptError(
                f"variant {spec.name!r} has a context of {limit} positions, but the run feeds it {longest} tokens "
                f"at once; lower 'text.context' (or shorten the prompts) in {cfg.source_file}"
            )
    return Plan(tokens=tokens, segments=segments, loaded=loaded, tokenizer=ref_tok)


def extract_all(cfg: Config, the_plan: Plan, log=print) -> tuple[dict[str, Store], dict[str, dict]]:
    stores, facts = {}, {}
    ids = tuple(p.id for p in the_plan.tokens.prompts)
    for spec in cfg.models:
        loaded = the_plan.loaded[spec.name]
        stores[spec.name], facts[spec.name] = extract.extract(
            loaded, the_plan.segments, the_plan.tokens.n_vocab, batch_size=cfg.batch_size,
            store_dtype=cfg.store_dtype, padding_side=cfg.padding_side, prompt_ids=ids, log=log,
        )  # fmt: skip
        facts[spec.name] |= {"source": spec.source, "revision": spec.revision, "path": loaded.path, "dtype": spec.dtype,
                             "device": loaded.device, "loader": spec.loader, "backend": spec.backend}  # fmt: skip
    return stores, facts
