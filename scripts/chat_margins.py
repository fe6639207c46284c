"""How firmly the full cache chooses each token of one turn's answer in a chat of the conversation task.

    python scripts/chat_margins.py [--split test] [--chat 0] [--turn 10] [--max-new-tokens 16] [--stability]

Replays chat ``--chat`` of ``conversations(tok, split, ...)`` (the docs' ten-turn chat is chat 0 of the test
split, 16 new tokens a turn) with a plain DynamicCache and prints, for every token of turn ``--turn``'s
answer, the full cache's top-1/top-2 log-probability margin and its second choice. A small margin where a
compressed cache's answer differs is a near-tie, which any change to attention may flip.

``--stability``: is the full cache's own answer at that turn stable under changes that keep the math exact?
The same turn answered by the full cache (the chat's earlier answers as they were) with eager attention
instead of SDPA, with the whole conversation prefilled in one call instead of turn by turn, and in float64.
If one of these gives another answer, the full cache's answer there is within rounding, not a property of the
cache.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    import torch

    from refreekv.commands.conversation import conversations
    from refreekv.commands.models import load_torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--split", default="test", choices=["dev", "test", "holdout"])
    p.add_argument("--chat", type=int, default=0)
    p.add_argument("--turn", type=int, default=10)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--stability", action="store_true", help="the turn's full-cache answer under exact-math changes")
    a = p.parse_args(argv)
    if not 1 <= a.turn <= 10:
        p.error(f"--turn: received {a.turn}; expected a turn from 1 to 10")
    if a.chat < 0 or a.max_new_tokens < 1:
        p.error(f"--chat / --max-new-tokens: received {a.chat} / {a.max_new_tokens}; expected an int >= 0 / >= 1")
    torch.set_grad_enabled(False)
    model, tok = load_torch()
    turns = conversations(tok, a.split, a.chat + 1)[a.chat]
    messages, out, new = replay(model, tok, turns[:a.turn], a.max_new_tokens)
    print(f"turn {a.turn}: {messages[-1]['content']!r}")
    for t, scores in zip(new, out.scores):
        top = scores[0].log_softmax(-1).topk(2)
        print(f"  {tok.decode([t])!r:>16}  margin {float(top.values[0] - top.values[1]):6.3f}  "
              f"second {tok.decode([int(top.indices[1])])!r}")
    if a.stability:
        history = messages[:-1]  # the chat up to this turn's question, earlier answers as the full cache gave them
        for label, kw in (("eager attention, turn by turn", dict(attn_implementation="eager")),
                          ("SDPA, the conversation prefilled in one call", dict()),
                          ("float64, the conversation prefilled in one call", dict(dtype="float64"))):
            other, _ = load_torch(**kw)
            if "turn by turn" in label:
                answer = replay(other, tok, turns[:a.turn], a.max_new_tokens)[0][-1]["content"]
            else:
                answer = once(other, tok, history, a.max_new_tokens)
            same = "same" if answer == messages[-1]["content"] else "DIFFERS"
            print(f"{label}: {answer!r} ({same} as the full cache's answer above)")


def once(model, tok, history: list[dict], max_new: int) -> str:
    """The next answer with the whole conversation prefilled in one call (a fresh cache)."""
    import torch

    ids = tok.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def replay(model, tok, turns: list, max_new: int):
    """The chat turn by turn with one reused cache (as the docs' loop runs it). -> (the messages, the last
    turn's ``generate`` output with its scores, the last answer's token ids)."""
    import torch
    from transformers import DynamicCache

    messages, cache = [], DynamicCache(config=model.config)
    for text, _ in turns:
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, do_sample=False,
                             max_new_tokens=max_new, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, ids.shape[1]:].tolist()
        messages.append({"role": "assistant", "content": tok.decode(new, skip_special_tokens=True).strip()})
    return messages, out, new

if __name__ == "__main__":
    main()
