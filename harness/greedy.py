"""Generate mode's continuations: the reference's raw greedy continuation of every prompt, cached beside the stores.

    harness extract --config configs/default.yaml mode=generate   # these first, then every model scored on them

Each prompt is generated on its own (greedy, not the model's sampling generation_config, never a padding column),
so a prompt's continuation does not depend on the others: an interrupted run resumes after the last finished prompt
(its `.progress.jsonl`), and `extract --part K/N` workers each generate a share and merge them. Every variant is
then teacher-forced on prompt + continuation by `harness.extract`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

import torch

from harness import loaders, paths
from harness.loaders import ExtractError, Loaded
from harness.progress import bar as progress_bar
from harness.prompts import TokenizedPrompts
from harness.store import store_key, writer_tag

GREEDY_VERSION = 2  # bump when the greedy continuations change (2: config.json's eos where there is no generation_config.json; padding ids never picked)
WAIT_S = 3600.0  # how long a generate-mode part waits for the other parts' greedy continuations (extract --wait)


def greedy_continuations(
    loaded: Loaded, tokens: TokenizedPrompts, max_new_tokens: int, log=print, part: tuple[int, int] | None = None,
    wait_s: float = WAIT_S,
) -> list[list[int]]:  # fmt: skip
    """The reference's raw greedy continuation of every prompt (not its sampling generation_config).

    Cached beside the stores: the continuation fixes the ids every variant is scored on. Each finished prompt's is
    also appended to a `.progress.jsonl` file as it comes, so an interrupted run resumes after the last finished
    prompt. With `part` (k, n), this worker generates only the prompts p with p % n == k - 1 (each prompt is generated
    on its own, so the split changes nothing), caches them, and waits up to `wait_s` seconds for the other parts'
    before it merges them all.
    """
    path = generations_path(loaded, tokens, max_new_tokens)
    key = path.stem
    if path.is_file():
        continuations = json.loads(path.read_text())["continuations"]
        with contextlib.suppress(OSError):  # its time is its last use (`harness store list`)
            os.utime(path)
        log(f"{loaded.spec.name}: the greedy continuations of {len(continuations)} prompts, as generated before: {path}")
        return continuations
    if part is None:
        with _progress(path, log) as progress:
            if path.is_file():  # another process generated them while this one waited
                progress.unlink(missing_ok=True)
                return json.loads(path.read_text())["continuations"]
            known = _shares(path, len(tokens.ids), log)
            continuations = _generate(loaded, tokens.ids, tokens.n_vocab, max_new_tokens, progress, log, known)
            _write_json(path, {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": continuations})
            progress.unlink()
    else:
        k, n = part
        parts = [path.with_name(f"{key}.part-{i}-of-{n}.json") for i in range(1, n + 1)]
        if not parts[k - 1].is_file():
            with _progress(parts[k - 1], log) as progress:
                if not parts[k - 1].is_file():
                    mine = _generate(loaded, tokens.ids[k - 1 :: n], tokens.n_vocab, max_new_tokens, progress, log)
                    _write_json(parts[k - 1], {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": mine})
                progress.unlink(missing_ok=True)
        deadline, told = time.monotonic() + wait_s, False
        while (missing := [i + 1 for i, f in enumerate(parts) if not f.is_file()]) and not path.is_file():
            if time.monotonic() >= deadline:
                raise ExtractError(
                    f"part {k}/{n}: the greedy continuations of part(s) {missing} are not in {path.parent} after "
                    f"{wait_s:.0f} s of waiting. Every part needs every prompt's continuation to cut its shards; this "
                    "part's are kept there. Run the missing parts (or this one again once they are done)."
                )
            if not told:
                log(f"part {k}/{n}: waiting up to {wait_s:.0f} s for the greedy continuations of part(s) {missing}")
                told = True
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        if missing:  # a plain run (which takes the shares there are) merged them while this part waited
            return json.loads(path.read_text())["continuations"]
        continuations = [[] for _ in tokens.ids]
        for i, f in enumerate(parts):
            try:
                share = json.loads(f.read_text())["continuations"]
            except (ValueError, KeyError, TypeError):
                share = None
            if not _token_lists(share) or len(share) != len(continuations[i::n]):
                raise ExtractError(f"{f} is not part {i + 1}/{n}'s share of these {len(continuations)} prompts' greedy "
                                   "continuations (another prompt set, or a damaged file): delete it and run that part again")  # fmt: skip
            continuations[i::n] = share
        _write_json(path, {"model": loaded.path, "max_new_tokens": max_new_tokens, "continuations": continuations})
    log(f"{loaded.spec.name}: {sum(map(len, continuations))} greedy tokens, cached in {path}")
    return continuations


def generations_path(loaded: Loaded, tokens: TokenizedPrompts, max_new_tokens: int) -> Path:
    """Where the reference's greedy continuations of these prompts are cached (a run record names it)."""
    key = store_key(what="greedy", version=GREEDY_VERSION, fingerprint=loaded.fingerprint, dtype=loaded.spec.dtype,
                    device=loaded.device.split(":")[0], ids=tokens.fingerprint, n=max_new_tokens,
                    loader=loaded.spec.loader, backend=loaded.spec.backend)  # fmt: skip
    return paths.store_dir() / "generations" / f"{key}.json"


def _shares(path: Path, n_prompts: int, log=print) -> dict[int, list[int]]:
    """The continuations that `--part K/N` runs left beside `path` (`<key>.part-K-of-N.json`, prompts K-1, K-1+N, ...),
    by prompt index: a plain run takes them rather than generate them again (each prompt is generated on its own,
    so a share's are the very ones it would generate); and the finished prompts of a part that stopped before its
    share was whole (its `.part-K-of-N.progress.jsonl`). A share that is not a list of token-id lists, one a prompt of
    its part, is left alone with a warning; where shares of two part counts disagree on a prompt, the first stands."""
    known = {}
    for share in sorted(path.parent.glob(f"{path.stem}.part-*-of-*.json")) + sorted(path.parent.glob(f"{path.stem}.part-*-of-*.progress.jsonl")):
        if not (m := re.fullmatch(r".*\.part-(\d+)-of-(\d+)\.(json|progress\.jsonl)", share.name)):
            continue
        k, n, finished = int(m[1]), int(m[2]), m[3] == "json"
        if finished:
            try:
                got = json.loads(share.read_text())["continuations"]
            except (OSError, ValueError, KeyError, TypeError):
                got = None
        else:  # another process may be appending to it: read, never cut
            got = _finished(share, cut=False)
        index = range(k - 1, n_prompts, n)
        if not (1 <= k <= n and _token_lists(got) and (len(got) == len(index) if finished else len(got) <= len(index))):
            log(f"warning: {share} is not a share of these {n_prompts} prompts' continuations: not taken")
            continue
        for i, ids in zip(index, got):  # a progress file: its first prompts only
            if known.setdefault(i, ids) != ids:
                log(f"warning: {share} disagrees with another share on prompt {i + 1}'s continuation: the other's is taken")
    return known


def _token_lists(x) -> bool:
    return isinstance(x, list) and all(isinstance(c, list) and all(type(t) is int for t in c) for c in x)


def _write_json(path: Path, data: dict) -> None:
    """Written under a temporary name and renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{writer_tag()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextlib.contextmanager
def _progress(cache: Path, log):
    """The `.progress.jsonl` file beside `cache`, locked: two processes generating the same continuations (a run and
    its repeat on a shared store) take turns rather than append to one file at once. Yields its path."""
    progress = cache.with_suffix(".progress.jsonl")
    waiting = f"waiting for another process that generates the continuations of {cache.name} ({progress} is locked)"
    with paths.exclusive(progress, waiting, log) as unlocked:
        if unlocked:
            log(f"warning: {progress.parent} cannot lock files ({unlocked}): do not run two generations of one config at once there")
        yield progress


def _finished(progress: Path, cut: bool = True) -> list[list[int]]:
    """The continuations a `.progress.jsonl` file holds, a line per prompt in order; a last line cut short by an
    interruption is dropped (and, with `cut`, cut from the file, so that the next line appended starts clean)."""
    if not progress.is_file():
        return []
    done, good = [], 0
    with progress.open("rb") as f:
        for line in f:
            try:
                ids = json.loads(line) if line.endswith(b"\n") else None
            except ValueError:
                ids = None
            if not isinstance(ids, list):
                break
            done.append(ids)
            good += len(line)
    if cut and good != progress.stat().st_size:
        os.truncate(progress, good)
    return done


def _generate(
    loaded: Loaded, prompts: tuple, n_vocab: int, max_new_tokens: int, progress: Path, log=print,
    known: dict[int, list[int]] | None = None,
) -> list[list[int]]:  # fmt: skip
    """Greedy continuations of these prompts' ids, one prompt at a time (so a prompt's does not depend on the others),
    each appended to `progress` when done; the prompts already there are not generated again, nor those in `known`
    (by prompt index; see _shares): the model loads only if some prompt is in neither."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class RealIds(LogitsProcessor):
        """The padding columns (ids n_vocab up to the 151936 or 152064 of the row) are no tokens: never picked."""

        def __call__(self, input_ids, scores):
            scores[:, n_vocab:] = -torch.inf
            return scores

    real_ids = LogitsProcessorList([RealIds()])
    continuations = _finished(progress)[: len(prompts)]
    if len(continuations) == len(prompts):
        return continuations
    if continuations:
        log(f"{loaded.spec.name}: greedy: resuming after {len(continuations)} of {len(prompts)} prompts ({progress})")
    known = known or {}
    if taken := sum(i in known for i in range(len(continuations), len(prompts))):
        log(f"{loaded.spec.name}: greedy: {taken} of {len(prompts)} prompts' continuations taken from the shares of an "
            f"`extract --part` run ({progress.parent})")  # fmt: skip
    model = None
    if any(i not in known for i in range(len(continuations), len(prompts))):
        own = loaders.load_generation_config(loaded)
        greedy = GenerationConfig(
            do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
            eos_token_id=own.eos_token_id, pad_token_id=own.pad_token_id or own.eos_token_id,
        )  # fmt: skip
        model = loaders.load_model(loaded)
        # Replaced rather than passed: generate() fills a passed config's unset fields from the model's own
        # (Qwen1.5-Chat's repetition_penalty 1.1 would creep into "greedy").
        model.generation_config = greedy
    try:
        with progress.open("a") as f:
            todo = range(len(continuations), len(prompts))
            for i in progress_bar(todo, desc=f"{loaded.spec.name}: greedy", unit="prompt", leave=False, initial=len(continuations), total=len(prompts)):
                if i in known:
                    continuations.append(known[i])
                else:
                    x = torch.tensor([prompts[i]], device=loaders.input_device(model))
                    with torch.no_grad():
                        out = model.generate(x, attention_mask=torch.ones_like(x), logits_processor=real_ids)
                    continuations.append(out[0, len(prompts[i]) :].tolist())
                f.write(json.dumps(continuations[-1]) + "\n")
                f.flush()
    finally:
        del model
        loaders.release_memory()
    return continuations
