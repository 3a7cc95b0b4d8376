"""Generate mode's greedy continuations (harness.greedy): cached, resumed after an interruption, split over parts."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import pytest
import torch

from harness import greedy, loaders, paths, prompts, zoo
from harness.config import ModelSpec

pytestmark = pytest.mark.slow
SMALL = Path(__file__).parent / "data" / "prompts-small.jsonl"
QUIET = {"log": lambda _: None}


def _loaded(name, dtype="float32"):
    return loaders.locate(ModelSpec(name=name, source=f"zoo:{name}", dtype=dtype), "micro")


@pytest.fixture(scope="module")
def tokens(tokenizer):
    return prompts.tokenize(tokenizer, prompts.load(SMALL), max_length=2048, source="ref")


def test_a_torn_progress_line_is_cut_from_the_file(tmp_path):
    """A generation interrupted mid-line: the torn line is dropped and cut, so the next line appended starts clean
    (else every line after it would be unreadable, and regenerated at each resume)."""
    p = tmp_path / "g.progress.jsonl"
    p.write_bytes(b"[1]\n[2, 3")
    assert greedy._finished(p) == [[1]] and p.read_bytes() == b"[1]\n"
    with p.open("a") as f:
        f.write("[4, 5]\n")
    assert greedy._finished(p) == [[1], [4, 5]]
    p.write_bytes(b"[1]\n{not json}\n[6]\n")  # a damaged line ends what can be trusted
    assert greedy._finished(p) == [[1]] and p.read_bytes() == b"[1]\n"
    assert greedy._finished(tmp_path / "none.jsonl") == []


def test_greedy_parts_wait_for_each_other(micro_zoo, tokens, tmp_path, monkeypatch):
    """Part 1 of 2 generates its share, then waits until part 2's share is there (written here by a thread a second
    after part 1's, from a single worker's run: loading models in two threads of one process at once would tangle
    transformers' global init state), and returns what one worker generates alone."""
    import time

    loaded = _loaded(zoo.CHAT_S)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "alone"))
    alone = greedy.greedy_continuations(loaded, tokens, 5, **QUIET)
    assert len(alone) == len(tokens.ids) and all(1 <= len(c) <= 5 for c in alone)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "parts"))
    gens = tmp_path / "parts" / "generations"

    def other_part():
        while not (mine := list(gens.glob("*.part-1-of-2.json"))):
            time.sleep(0.05)
        time.sleep(1.0)
        key = mine[0].name.split(".")[0]
        greedy._write_json(gens / f"{key}.part-2-of-2.json", {"continuations": alone[1::2]})

    thread = threading.Thread(target=other_part, daemon=True)
    thread.start()
    said = []
    got = greedy.greedy_continuations(loaded, tokens, 5, part=(1, 2), wait_s=60, log=said.append)
    thread.join()
    assert got == alone
    assert any("part 1/2: waiting up to 60 s for the greedy continuations of part(s) [2]" in m for m in said)
    assert json.loads(next(p for p in gens.glob("*.json") if ".part-" not in p.name).read_text())["continuations"] == alone


def test_greedy_resumes_after_an_interruption(micro_zoo, tokens, tmp_path, monkeypatch):
    """Interrupted at the third prompt, generation keeps the two finished ones (and drops a line cut short); the next
    call generates only the rest, and gives what an uninterrupted run gives."""
    loaded = _loaded(zoo.CHAT_S)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "alone"))
    alone = greedy.greedy_continuations(loaded, tokens, 5, **QUIET)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "resumed"))
    load, calls = loaders.load_model, []

    def counted(stop_at):
        def load_model(x):
            model = load(x)
            generate = model.generate

            def gen(*args, **kwargs):
                calls.append(1)
                if len(calls) == stop_at:
                    raise KeyboardInterrupt
                return generate(*args, **kwargs)

            model.generate = gen
            return model

        return load_model

    monkeypatch.setattr(loaders, "load_model", counted(3))
    with pytest.raises(KeyboardInterrupt):
        greedy.greedy_continuations(loaded, tokens, 5, **QUIET)
    (progress,) = (tmp_path / "resumed" / "generations").glob("*.progress.jsonl")
    assert [json.loads(line) for line in progress.read_text().splitlines()] == alone[:2]
    with progress.open("a") as f:
        f.write("[151643, 27")  # a line cut short by the interruption
    calls.clear()
    monkeypatch.setattr(loaders, "load_model", counted(0))
    said = []
    assert greedy.greedy_continuations(loaded, tokens, 5, log=said.append) == alone
    assert len(calls) == len(tokens.ids) - 2
    assert any(f"greedy: resuming after 2 of {len(tokens.ids)} prompts" in m for m in said)
    assert not progress.exists()  # the cache is whole: no progress file left


def test_a_plain_run_takes_the_shares_of_a_part_run(micro_zoo, tokens, tmp_path, monkeypatch):
    """`extract --part 1/3` left its share and the other parts never ran: a plain run generates only the other
    prompts, and gives what one run alone gives. With every share there, it loads no model at all; a rerun says where
    its continuations come from. A share that does not fit the prompts (another prompt count) is left alone."""
    loaded = _loaded(zoo.CHAT_S)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "alone"))
    alone = greedy.greedy_continuations(loaded, tokens, 5, **QUIET)
    (merged,) = (tmp_path / "alone" / "generations").glob("*.json")
    key, n = merged.stem, len(tokens.ids)
    gens = tmp_path / "parts" / "generations"
    greedy._write_json(gens / f"{key}.part-1-of-3.json", {"continuations": alone[0::3]})
    greedy._write_json(gens / f"{key}.part-2-of-4.json", {"continuations": alone[1::4][:-1] + [[1, 2]] * 2})  # misfit
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "parts"))
    load, prompts_generated = loaders.load_model, []

    def counting_load(x):
        model = load(x)
        generate = model.generate

        def gen(ids, **kwargs):
            prompts_generated.append(ids[0].tolist())
            return generate(ids, **kwargs)

        model.generate = gen
        return model

    monkeypatch.setattr(loaders, "load_model", counting_load)
    said = []
    assert greedy.greedy_continuations(loaded, tokens, 5, log=said.append) == alone
    assert prompts_generated == [list(tokens.ids[i]) for i in range(n) if i % 3 != 0]
    assert any(f"greedy: {len(range(0, n, 3))} of {n} prompts' continuations taken from the shares" in m for m in said)
    said.clear()
    assert greedy.greedy_continuations(loaded, tokens, 5, log=said.append) == alone  # cached now
    assert said == [f"{zoo.CHAT_S}: the greedy continuations of {n} prompts, as generated before: {gens / merged.name}"]

    monkeypatch.setenv("HARNESS_STORE", str(tmp_path / "all-shares"))
    for k in (1, 2):
        greedy._write_json(tmp_path / "all-shares" / "generations" / f"{key}.part-{k}-of-2.json", {"continuations": alone[k - 1 :: 2]})
    monkeypatch.setattr(loaders, "load_model", lambda x: pytest.fail("a model loaded though every share was there"))
    assert greedy.greedy_continuations(loaded, tokens, 5, **QUIET) == alone


def test_shares_that_do_not_fit_or_disagree(tmp_path):
    """_shares takes only lists of token-id lists that fit their part of the prompts; where shares of two part
    counts disagree on a prompt, the first stands; each refusal is a warning naming the file."""
    path = tmp_path / "k.json"
    for name, continuations in (("part-1-of-2", [[1], [3]]), ("part-2-of-2", [[2], [4, 5]]), ("part-1-of-3", [[9], [4, 5]]),
                                ("part-2-of-3", [[2], "x"]), ("part-3-of-3", [[3, 0.5]]), ("part-4-of-3", [[1]])):  # fmt: skip
        greedy._write_json(tmp_path / f"k.{name}.json", {"continuations": continuations})
    said = []
    assert greedy._shares(path, 4, said.append) == {0: [1], 1: [2], 2: [3], 3: [4, 5]}
    assert said == [f"warning: {tmp_path / 'k.part-1-of-3.json'} disagrees with another share on prompt 1's continuation: the other's is taken",
                    *(f"warning: {tmp_path / f'k.part-{k}-of-3.json'} is not a share of these 4 prompts' continuations: not taken" for k in (2, 3, 4))]  # fmt: skip


def test_a_stopped_parts_finished_prompts_are_taken_without_cutting_its_file(tmp_path):
    """A part stopped (killed) before its share was whole leaves `.part-K-of-N.progress.jsonl`: a plain run takes its
    finished prompts (the next part's run appends to that file, so a torn last line is read past, not cut); one
    with more lines than its part has prompts is not taken."""
    path = tmp_path / "k.json"
    progress = tmp_path / "k.part-2-of-2.progress.jsonl"
    progress.write_bytes(b"[7, 8]\n[9]\n[10, 1")  # prompts 1 and 3 finished, prompt 5 cut short
    greedy._write_json(tmp_path / "k.part-1-of-2.json", {"continuations": [[1], [2], [3]]})
    assert greedy._shares(path, 6, lambda _: None) == {0: [1], 2: [2], 4: [3], 1: [7, 8], 3: [9]}
    assert progress.read_bytes().endswith(b"[10, 1")  # left as it was
    said = []
    progress.write_text("[1]\n[2]\n[3]\n[4]\n")  # 4 lines, and part 2 of 2 of 6 prompts has 3
    assert greedy._shares(path, 6, said.append) == {0: [1], 2: [2], 4: [3]}
    assert said == [f"warning: {progress} is not a share of these 6 prompts' continuations: not taken"]


def test_a_waiting_part_ends_when_a_plain_run_merged_the_shares(micro_zoo, tokens, tmp_path, monkeypatch):
    """A part waiting for the others' shares stops waiting once a plain run has written the merged continuations; a
    part's share that does not fit the prompts stops the merge with an error naming it."""
    import time

    loaded = _loaded(zoo.CHAT_S)
    monkeypatch.setenv("HARNESS_STORE", str(tmp_path))
    with pytest.raises(loaders.ExtractError, match=r"part\(s\) \[2\] are not in"):
        greedy.greedy_continuations(loaded, tokens, 3, part=(1, 2), wait_s=0, **QUIET)
    (mine,) = (tmp_path / "generations").glob("*.part-1-of-2.json")
    merged = mine.with_name(mine.name.split(".")[0] + ".json")
    whole = [[7]] * len(tokens.ids)  # what a plain run wrote (not what it would generate: it tells them apart)
    threading.Timer(1.0, greedy._write_json, (merged, {"continuations": whole})).start()
    start = time.monotonic()
    assert greedy.greedy_continuations(loaded, tokens, 3, part=(1, 2), wait_s=60, **QUIET) == whole
    assert time.monotonic() - start < 30
    merged.unlink()
    greedy._write_json(mine.with_name(mine.name.replace("part-1", "part-2")), {"continuations": [[1, 2]]})  # too few
    with pytest.raises(loaders.ExtractError, match=r"part-2-of-2\.json is not part 2/2's share of these 8 prompts'"):
        greedy.greedy_continuations(loaded, tokens, 3, part=(1, 2), wait_s=0, **QUIET)


def test_progress_lock_where_the_file_system_has_none(tmp_path, monkeypatch):
    """Some network mounts refuse flock: generation goes on unlocked, with a warning; other lock errors still raise."""

    def no_locks(f, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(paths.fcntl, "flock", no_locks)
    said = []
    with greedy._progress(tmp_path / "g.json", said.append) as progress:
        assert progress == tmp_path / "g.progress.jsonl" and progress.exists()
    assert "cannot lock files (No locks available)" in said[0]

    def broken(f, op):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(paths.fcntl, "flock", broken)
    with pytest.raises(OSError, match="I/O error"), greedy._progress(tmp_path / "g.json", said.append):
        pass


def _copy_model(src: Path, dst: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A local folder (not a zoo build) holding a zoo model's files, with `config` merged into config.json."""
    import shutil

    dst.mkdir()
    for f in src.iterdir():
        if f.name not in drop and f.name != zoo.MANIFEST:
            shutil.copy(f, dst / f.name)
    if config:
        path = dst / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return dst


def test_greedy_stops_at_config_json_eos_without_a_generation_config(micro_zoo, tokenizer, tmp_path, tmp_store):
    """A fine-tuned folder often lacks generation_config.json: transformers then takes eos from config.json, and so
    must the greedy continuation (it ran on to max_new_tokens, scoring tokens past the end of the turn)."""
    src = zoo.model_dir(zoo.CHAT_S, "micro")
    chats = tuple(prompts.Prompt(id=str(i), messages=(("user", f"Explain the Python topic '{t}'."),)) for i, t in enumerate(("assert", "with")))
    few = prompts.tokenize(tokenizer, chats, max_length=2000, source="ref", generation_prompt=True)
    free = greedy.greedy_continuations(loaders.locate(ModelSpec(name="free", source=str(_copy_model(src, tmp_path / "free", {"eos_token_id": None}, drop=("generation_config.json",)))), "micro"), few, 8, **QUIET)  # fmt: skip
    # the first token not seen before it, made the end of text: prompt 1's continuation must stop there (the first
    # token itself where the micro model repeats it 8 times, as one machine's weights do)
    first_new = next((i for i in range(1, 8) if free[0][i] not in free[0][:i]), 0)
    stop = free[0][first_new]
    folder = _copy_model(src, tmp_path / "eos", {"eos_token_id": stop}, drop=("generation_config.json",))
    loaded = loaders.locate(ModelSpec(name="eos", source=str(folder)), "micro")
    got = greedy.greedy_continuations(loaded, few, 8, **QUIET)
    assert len(free[0]) == 8 and got[0] == free[0][: first_new + 1]  # the eos is kept as the last scored token
    for ids, cont in zip(few.ids, got, strict=True):  # as transformers' own greedy generate() does
        x = torch.tensor([ids])
        out = loaders.load_model(loaded).generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=8)
        assert out[0, len(ids) :].tolist() == cont


def test_greedy_never_picks_a_padding_column(micro_zoo, tokens, tmp_path, tmp_store):
    """The logit row is wider than the tokenizer (151936 vs 151646): a padding column that wins the argmax is no token.
    Greedy takes the best real id instead, as the stored rows (cut to the real ids) say."""
    from transformers import AutoModelForCausalLM

    src = zoo.model_dir(zoo.CHAT_S, "micro")
    few = prompts.TokenizedPrompts(tokens.prompts[:2], tokens.ids[:2], tokens.n_vocab)
    loaded = loaders.locate(ModelSpec(name="plain", source=str(_copy_model(src, tmp_path / "plain"))), "micro")
    plain = greedy.greedy_continuations(loaded, few, 6, **QUIET)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    pad = tokens.n_vocab + 54  # a padding column; the output layer is tied to the embeddings
    with torch.no_grad():
        model.get_output_embeddings().weight[pad] = 3 * model.get_output_embeddings().weight[plain[0][0]]
    x = torch.tensor([few.ids[0]])
    assert int(model(x).logits[0, -1].argmax()) == pad  # the padding column wins the raw argmax
    folder = _copy_model(src, tmp_path / "padded", drop=("model.safetensors",))
    model.save_pretrained(folder)
    got = greedy.greedy_continuations(loaders.locate(ModelSpec(name="padded", source=str(folder)), "micro"), few, 6, **QUIET)
    assert all(t < tokens.n_vocab for c in got for t in c) and got[0][0] == plain[0][0]
