"""Training for the embedded tiny Qwen1.5 family: corpus, ChatML dialogues, and a compact-vocab loop.

The corpus is text Python itself ships (`pydoc_data.topics`, ~106k Qwen tokens over 79 topics), so
nothing is downloaded. It uses ~6k of the 151646 token ids, and the full-width output layer is what
makes CPU training slow, so a model trains with a *compact* vocabulary: the ids the corpus uses plus
one "rest" class that stands for every other column of the real vocab (its logit is shifted by
log(number of other columns)). Expanding it afterwards, every unused column gets the rest row, and
the full model's softmax is then the trained compact softmax (up to a small, seeded row jitter that
keeps the unused columns from tying exactly).

    python -m harness.train          # a short smoke run: prints loss and top-1 of a micro model
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from harness import progress

# The Qwen2 classes are imported where a model is built: their modelling code takes ~1.5 s to import, and every
# compare imports this module (for the zoo's profiles) without building anything.
if TYPE_CHECKING:
    from transformers import Qwen2Config, Qwen2ForCausalLM

HELD_OUT_EVERY = 10  # every 10th topic (sorted by name) is held out for the card's eval numbers


@dataclass(frozen=True)
class Corpus:
    train: list[list[int]]  # token ids per topic, each ending in <|endoftext|>
    held_out: list[list[int]]
    dialogues: list[list[tuple[str, str]]]  # [(role, content), ...] per ChatML dialogue


def topic_texts() -> dict[str, str]:
    import pydoc_data.topics

    return {name: pydoc_data.topics.topics[name].strip() for name in sorted(pydoc_data.topics.topics)}


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]


def build_dialogues(texts: dict[str, str]) -> list[list[tuple[str, str]]]:
    """Single- and multi-turn ChatML dialogues about each topic, answered from the topic's text."""
    asks = (
        "Explain the Python topic '{}'.",
        "What does the Python documentation say about '{}'?",
        "Can you describe '{}' in Python?",
    )
    dialogues = []
    for i, (name, text) in enumerate(texts.items()):
        paras = paragraphs(text)
        if not paras:
            continue
        for j, ask in enumerate(asks):
            turns = [("user", ask.format(name)), ("assistant", paras[j % len(paras)][:600])]
            if len(paras) > 1 and (i + j) % 2 == 0:
                turns += [("user", "Tell me more."), ("assistant", paras[(j + 1) % len(paras)][:600])]
            dialogues.append(turns)
    return dialogues


def load_corpus(tokenizer) -> Corpus:
    texts = topic_texts()
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    train, held_out = [], []
    for i, text in enumerate(texts.values()):
        (held_out if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 else train).append(
            tokenizer(text).input_ids + [eos]
        )
    return Corpus(train=train, held_out=held_out, dialogues=build_dialogues(texts))


def chat_ids(tokenizer, dialogue: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Token ids of one ChatML dialogue and a 0/1 mask of the positions to learn (assistant turns)."""
    ids, learn = [], []
    messages = [{"role": "system", "content": "You are a helpful assistant"}]
    messages += [{"role": r, "content": c} for r, c in dialogue]
    for k, message in enumerate(messages):
        piece = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        prev = tokenizer.apply_chat_template(messages[:k], tokenize=False) if k else ""
        new = tokenizer(piece[len(prev) :]).input_ids
        ids += new
        learn += [int(message["role"] == "assistant")] * len(new)
    return ids, learn


@dataclass(frozen=True)
class Arch:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab_size: int  # padded width of the output layer: 151936 (<= 7B) or 152064 (>= 14B)
    tied: bool


def qwen2_config(arch: Arch, *, chat: bool, vocab_size: int | None = None) -> Qwen2Config:
    """A Qwen2Config with Qwen1.5's conventions (qkv bias, rope 1e6, no BOS, eos by flavour)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size or arch.vocab_size,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.heads,
        max_position_embeddings=2048,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=arch.tied,
        use_sliding_window=False,
        sliding_window=None,
        bos_token_id=151643,
        eos_token_id=151645 if chat else 151643,
        pad_token_id=None,
    )


class CompactLM:
    """A Qwen2ForCausalLM over a compact vocabulary `used` (sorted real ids) + one rest class."""

    def __init__(self, arch: Arch, used: torch.Tensor, *, seed: int, chat: bool):
        torch.manual_seed(seed)
        self.arch = arch
        self.used = used  # [U] int64, sorted real token ids
        self.remap = torch.full((arch.vocab_size,), len(used), dtype=torch.long)  # unused -> rest
        self.remap[used] = torch.arange(len(used))
        # log of how many full-vocab columns the rest class stands for
        self.rest_log_count = math.log(arch.vocab_size - len(used))
        from transformers import Qwen2ForCausalLM

        self.model = Qwen2ForCausalLM(qwen2_config(arch, chat=chat, vocab_size=len(used) + 1))

    def logits(self, compact_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] compact ids -> [B, T, U + 1] logits of the compact softmax."""
        logits = self.model(input_ids=compact_ids).logits
        return torch.cat([logits[..., :-1], logits[..., -1:] + self.rest_log_count], dim=-1)

    def expand(self, *, chat: bool, seed: int) -> Qwen2ForCausalLM:
        """The full-vocabulary model: trained rows at their real ids, the rest row everywhere else."""
        from transformers import Qwen2ForCausalLM

        full = Qwen2ForCausalLM(qwen2_config(self.arch, chat=chat))
        state = self.model.state_dict()
        gen = torch.Generator().manual_seed(seed + 1)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            if key == "lm_head.weight" and self.arch.tied:
                continue
            compact = state[key]  # [U + 1, H]
            rest = compact[-1]
            jitter = 0.01 * rest.abs().mean() * torch.randn(self.arch.vocab_size, self.arch.hidden, generator=gen)
            rows = rest.expand(self.arch.vocab_size, -1) + jitter
            rows[self.used] = compact[:-1]
            state[key] = rows.contiguous()
        if self.arch.tied:
            state.pop("lm_head.weight", None)
        missing, unexpected = full.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"expanding the compact model: missing {missing}, unexpected {unexpected}")
        if self.arch.tied:
            full.tie_weights()
        return full.eval()


@dataclass(frozen=True)
class TrainResult:
    steps: int
    final_loss: float  # nats, mean over the last 20 steps
    held_out_loss: float  # nats per token
    held_out_top1: float  # fraction of held-out next tokens that are the argmax
    held_out_entropy: float  # nats, mean predictive entropy on held-out positions
    tokens_per_s: float
    seconds: float


def windows(seqs: list[list[int]], masks: list[list[int]] | None, length: int):
    """Concatenates sequences and cuts them into [N, length + 1] windows of ids and learn-masks."""
    ids = torch.tensor([t for s in seqs for t in s])
    mask = torch.tensor([m for s in masks for m in s]) if masks else torch.ones_like(ids)
    n = (len(ids) - 1) // length
    starts = torch.arange(n) * length
    idx = starts[:, None] + torch.arange(length + 1)
    return ids[idx], mask[idx]


def train(
    lm: CompactLM,
    ids: torch.Tensor,  # [N, T + 1] real token ids
    mask: torch.Tensor,  # [N, T + 1] 1 where the position is learned
    *,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    desc: str,
    eval_ids: torch.Tensor | None = None,
) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    compact, learn = lm.remap[ids], mask[:, 1:].float()
    lm.model.train()
    losses, start = [], time.perf_counter()
    for _ in progress.bar(range(steps), desc=desc, unit="step", leave=False):
        pick = torch.randint(0, len(compact), (batch,), generator=gen)
        x = compact[pick]
        logits = lm.logits(x[:, :-1])
        nll = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        w = learn[pick].flatten()
        loss = (nll * w).sum() / w.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    lm.model.eval()
    held = evaluate(lm, eval_ids) if eval_ids is not None else (float("nan"),) * 3
    return TrainResult(
        steps=steps,
        final_loss=sum(losses[-20:]) / len(losses[-20:]),
        held_out_loss=held[0],
        held_out_top1=held[1],
        held_out_entropy=held[2],
        tokens_per_s=steps * batch * (ids.shape[1] - 1) / seconds,
        seconds=seconds,
    )


@torch.no_grad()
def evaluate(lm: CompactLM, ids: torch.Tensor) -> tuple[float, float, float]:
    """(loss in nats, top-1 accuracy, mean entropy in nats) over [N, T + 1] real-id windows."""
    compact = lm.remap[ids]
    logp = torch.log_softmax(lm.logits(compact[:, :-1]), dim=-1)  # [N, T, U + 1]
    target = compact[:, 1:]
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    # A target outside the compact vocab is one of the rest's columns: pay for picking it out.
    nll = nll + (target == len(lm.used)) * lm.rest_log_count
    top1 = (logp.argmax(-1) == target) & (target != len(lm.used))
    p = logp.exp()
    ent = -(p * logp).sum(-1) + p[..., -1] * lm.rest_log_count
    return nll.mean().item(), top1.float().mean().item(), ent.mean().item()


if __name__ == "__main__":
    from harness.qwen_tokenizer import build_tokenizer

    tok = build_tokenizer()
    corpus = load_corpus(tok)
    used = torch.tensor(sorted({t for s in corpus.train + corpus.held_out for t in s}))
    arch = Arch(hidden=64, layers=2, heads=4, intermediate=128, vocab_size=151936, tied=True)
    lm = CompactLM(arch, used, seed=0, chat=False)
    x, m = windows(corpus.train, None, 128)
    ev, _ = windows(corpus.held_out, None, 128)
    print(train(lm, x, m, steps=100, batch=16, lr=3e-3, seed=0, desc="smoke", eval_ids=ev))
