"""Make the demo instruction set ``data/instruct_demo/{train,valid}.jsonl`` (seeded, byte for byte
reproducible: the shipped files are this script's output, and a test regenerates them).

    python tools/make_instruct_demo.py [--out data/instruct_demo] [--seed 0]

The rule: the user gives three or four common English words and the answer is the last of them,
nothing else ("peace law nation" -> "nation"). The user's text never states the rule and its
wording varies, so a model can only learn it from the answers: with the loss masked to the
answers, that is all it is trained on. The words
are frequent in the State of the Union corpus (each one piece of the demo's 8000-piece tokenizer),
so a model pretrained on it knows them and only the rule is new.

The records mix every form ``megallama-preprocess`` reads: ``messages`` without and with a system
prompt, multi-turn dialogs (each turn its own words) and the short ``prompt``/``response`` form
(some with ``system``). No word tuple of the validation set occurs in the training set.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = tuple("""
people nation world peace work year government country time state law power war money children
family health land water food school city home trade tax bill house court right plan job life
hope freedom history union treaty energy labor justice force public market farm river road ship
""".split())
ASKS = ("{words}", "Words: {words}", "Here are some words: {words}", "{words}?",
        "Try these: {words}", "Next: {words}")
SYSTEMS = ("You are a helpful assistant.", "Answer with words only.", "Be brief.")
TRAIN_DIALOGS, VALID_DIALOGS = 2000, 200


def _words(rng: random.Random, taken: set[tuple[str, ...]]) -> tuple[str, ...]:
    """Three or four distinct words, a tuple not in ``taken`` (then added to it)."""
    while True:
        chosen = tuple(rng.sample(WORDS, rng.choice((3, 4))))
        if chosen not in taken:
            taken.add(chosen)
            return chosen


def _turn(rng: random.Random, taken: set[tuple[str, ...]]) -> tuple[str, str]:
    """(user text, answer) of one turn: the answer is the user's last word."""
    words = _words(rng, taken)
    return rng.choice(ASKS).format(words=" ".join(words)), words[-1]


def _record(rng: random.Random, taken: set[tuple[str, ...]]) -> dict:
    """One dialog in one of the record forms, chosen at random."""
    form = rng.random()
    if form < 0.25:  # the short form, a third of them with a system prompt
        user, answer = _turn(rng, taken)
        system = {"system": rng.choice(SYSTEMS)} if rng.random() < 1 / 3 else {}
        return {**system, "prompt": user, "response": answer}
    turns = 1 if form < 0.75 else rng.choice((2, 3))
    system = rng.random() < 0.4 and turns < 3  # (three turns and a system prompt: too long)
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if system else []
    for _ in range(turns):
        user, answer = _turn(rng, taken)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"messages": messages}


def make(seed: int = 0) -> dict[str, str]:
    """The files' contents: ``{"train.jsonl": ..., "valid.jsonl": ...}``. The validation set is
    drawn first; the training set never repeats one of its word tuples."""
    rng = random.Random(seed)
    taken: set[tuple[str, ...]] = set()
    files = {}
    for name, count in (("valid.jsonl", VALID_DIALOGS), ("train.jsonl", TRAIN_DIALOGS)):
        lines = [json.dumps(_record(rng, taken), separators=(",", ":")) for _ in range(count)]
        files[name] = "\n".join(lines) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "data" / "instruct_demo",
                        help="directory to write train.jsonl and valid.jsonl into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in make(args.seed).items():
        (args.out / name).write_bytes(text.encode("utf-8"))
        print(f"{args.out / name}: {text.count(chr(10))} dialogs, {len(text):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
