"""The quality benchmark's prompts, in three fixed splits built from disjoint material.

``dev`` is for choosing (essays 0-23, dev needle phrasings and key names, seed 11). ``test`` (essays
24-48, other phrasings and names, seed 29) was for reporting only until round three of issue 10,
which chose the default on dev and test together (docs/results.md). ``holdout`` is for reporting
since then and never for choosing: other kinds of text (Verne's "In the Year 2889" and a span of
the King James Bible, ``prompts.holdout_texts``), its own phrasings, names, questions and seed 47.
Every prompt is built by token count, so a "4k" prompt is about 4096 tokens with the chat template.

Tasks per split (sizes for ``--size full``):
- needle: 4 lengths (1k, 2k, 4k, 7.5k; SmolLM2's context is 8k) x 5 depths x 3 phrasings = 60
  prompts, the question inside the compressed prompt; right when the number is in the answer.
- multikey: RULER-style, 4 "special code" lines, asked for one: 4 at 2k and 4 at 4k tokens.
- continuation: 128 essay tokens teacher-forced after a 2k-token context: KL(full || method),
  top-1 agreement with the full cache, perplexity.
- open: "summarise" and "what does the author argue" over 1.5k-token essays; the full cache's
  answer is the reference: similarity of the greedy answers and teacher-forced KL on the full
  cache's answer tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

from .prompts import chat, essays, holdout_texts

LENGTHS = {"full": (1024, 2048, 4096, 7500), "medium": (1024, 2048), "quick": (384,)}
DEPTHS = {"full": (0.1, 0.3, 0.5, 0.7, 0.9), "medium": (0.1, 0.5, 0.9), "quick": (0.5,)}


@dataclass(frozen=True)
class Split:
    name: str
    essays: range
    seed: int
    needles: tuple[tuple[str, str], ...]   # (sentence with {number}, question)
    names: tuple[str, ...]                 # multi-key names
    open_questions: tuple[str, ...]
    source: str = "essays"                 # essays (Paul Graham, ``essays`` indexes them) | holdout

    def documents(self) -> list[str]:
        """The split's texts, in the order its token stream concatenates them."""
        if self.source == "holdout":
            return holdout_texts()
        texts = essays()
        return [texts[i % len(texts)] for i in self.essays]


SPLITS = {
    "dev": Split("dev", range(0, 24), 11, (
        ("The magic number is {number}.", "What is the magic number mentioned in the text?"),
        ("The secret code for the blue vault is {number}.", "What is the secret code for the blue vault?"),
        ("Remember: the delivery pin is {number}.", "What is the delivery pin?"),
    ), ("amber", "cobalt", "falcon", "granite", "harbor", "indigo", "juniper", "lotus"), (
        "Summarize the text above in two sentences.",
        "What is the main argument of the text above? Answer in one sentence.",
    )),
    "test": Split("test", range(24, 49), 29, (
        ("The access number for the archive room is {number}.", "What is the access number for the archive room?"),
        ("Note that the winning lottery ticket was number {number}.", "What was the number of the winning lottery ticket?"),
        ("The password to open the garden gate is {number}.", "What is the password to open the garden gate?"),
    ), ("maple", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "willow"), (
        "Write a two-sentence summary of the text above.",
        "What does the author argue in the text above? Answer in one sentence.",
    )),
    "holdout": Split("holdout", range(0), 47, (
        ("The combination of the red safe is {number}.", "What is the combination of the red safe?"),
        ("Keep in mind that the locker number is {number}.", "What is the locker number?"),
        ("The ferry ticket bought that morning bore the number {number}.",
         "What number did the ferry ticket bear?"),
    ), ("acorn", "basalt", "cedar", "dune", "ember", "fjord", "garnet", "heron"), (
        "Summarize the passage above in two sentences.",
        "What is the passage above about? Answer in one sentence.",
    ), source="holdout"),
}
ANSWER_FORMAT = " Answer with the number only."


@dataclass(frozen=True)
class Prompt:
    """One task prompt: ``text`` is ready for the tokenizer (chat template applied) unless
    ``kind == "continuation"``, where ``text`` is the raw context and ``target`` the continuation."""

    id: str
    kind: str        # needle | multikey | continuation | open
    text: str
    expect: str      # what a right answer contains ("" when the full cache is the reference)
    length: int      # target length in tokens
    target: str = ""


@lru_cache(maxsize=8)
def _split_tokens(tok_name: str, split: str, tok) -> list[int]:
    """The split's texts, tokenized once, as one stream."""
    ids: list[int] = []
    for text in SPLITS[split].documents():
        ids += tok.encode(text + "\n\n", add_special_tokens=False)  # HF and mlx-lm tokenizers alike
    return ids


def filler(tok, split: str, tokens: int, offset: int) -> str:
    """About ``tokens`` tokens of the split's texts, starting ``offset`` tokens into its stream."""
    stream = _split_tokens(getattr(tok, "name_or_path", "tok"), split, tok)
    offset %= max(1, len(stream) - tokens)
    return tok.decode(stream[offset:offset + tokens])


def _insert(text: str, depth: float, sentence: str) -> str:
    """``sentence`` at the sentence boundary nearest after fractional ``depth`` of ``text``."""
    at = int(len(text) * depth)
    nxt = text.find(". ", at)
    at = len(text) if nxt < 0 else nxt + 2
    return text[:at] + sentence + " " + text[at:]


def _chat_overhead(tok) -> int:
    return len(tok(chat(tok, ""))["input_ids"])


def build(tok, split: str, size: str = "full") -> list[Prompt]:
    """Every prompt of ``split`` at ``size``, in a fixed order."""
    sp = SPLITS[split]
    rng = random.Random(sp.seed)
    lengths, depths = LENGTHS[size], DEPTHS[size]
    phrasings = sp.needles if size == "full" else sp.needles[:1]
    over = _chat_overhead(tok)
    out: list[Prompt] = []
    offset = 0
    for length in lengths:
        for depth in depths:
            for p, (sentence, question) in enumerate(phrasings):
                number = str(rng.randint(1000, 9999))
                q = question + ANSWER_FORMAT
                body = filler(tok, split, length - over - len(tok(q)["input_ids"]) - 16, offset)
                offset += 3001
                text = chat(tok, _insert(body, depth, sentence.format(number=number)) + "\n\n" + q)
                out.append(Prompt(f"{split}/needle/{length}/d{depth}/p{p}", "needle", text, number, length))
    mk_lengths = [x for x in (2048, 4096) if x <= max(lengths)] or [lengths[0]]
    per = 4 if size == "full" else 1
    for length in mk_lengths:
        for i in range(per):
            names = rng.sample(sp.names, 4)
            codes = [str(rng.randint(1000, 9999)) for _ in names]
            target = rng.randrange(4)
            q = f"What is the special code for {names[target]}?" + ANSWER_FORMAT
            body = filler(tok, split, length - over - 80, offset)
            offset += 3001
            for name, code in zip(names, codes):
                body = _insert(body, rng.random(), f"The special code for {name} is {code}.")
            out.append(Prompt(f"{split}/multikey/{length}/{i}", "multikey", chat(tok, body + "\n\n" + q),
                              codes[target], length))
    ctx, cont = (2048, 128) if size == "full" else (1024, 128) if size == "medium" else (256, 24)
    # 12 continuations at full size (4 before: too few to estimate a KL; prompts 0-3 are unchanged)
    for i in range(12 if size == "full" else 2 if size == "medium" else 1):
        stream = _split_tokens(getattr(tok, "name_or_path", "tok"), split, tok)
        at = (offset + 7919 * i) % max(1, len(stream) - ctx - cont)
        out.append(Prompt(f"{split}/continuation/{ctx}/{i}", "continuation", tok.decode(stream[at:at + ctx]), "", ctx,
                          target=tok.decode(stream[at + ctx:at + ctx + cont])))
    olen = 1536 if size != "quick" else 384
    for i in range(4 if size == "full" else 2 if size == "medium" else 1):
        q = sp.open_questions[i % len(sp.open_questions)]
        body = filler(tok, split, olen - over - 30, offset)
        offset += 3001
        out.append(Prompt(f"{split}/open/{olen}/{i}", "open", chat(tok, body + "\n\n" + q), "", olen))
    return out
