"""Exact-match accuracy of a chat model on held-out dialogs: for each dialog of a chat JSONL file,
the model answers its last user turn (the dialog so far as context, Meta's chat format, greedy)
and the answer is compared with the file's. Used by the fine-tuning demo
(launch/finetune_demo.sh) to show that a fine-tuned model follows the rule of its training answers.

    python tools/chat_accuracy.py --checkpoint runs/sft/hf --format hf \
        --data data/instruct_demo/valid.jsonl --limit 100 --show 3

Prints a JSON line ``{"accuracy": ..., "dialogs": ...}`` after ``--show`` examples.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from megallama.data.chat import encode_dialog_prompt, record_messages
from megallama.inference.generation import generate
from megallama.inference.loader import load_for_inference, open_tokenizer


def held_out(path: Path, limit: int) -> list[tuple[list[dict], str]]:
    """(messages up to the last user turn, expected answer) of the first ``limit`` dialogs."""
    cases = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            messages = record_messages(json.loads(line))
            cases.append((messages[:-1], messages[-1]["content"].strip()))
            if len(cases) == limit:
                break
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--format", default="megallama", choices=["megallama", "meta", "hf"])
    p.add_argument("--data", type=Path, required=True, help="chat JSONL (messages or prompt/response)")
    p.add_argument("--limit", type=int, default=100, help="dialogs to score")
    p.add_argument("--show", type=int, default=3, help="examples to print")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args()
    model = load_for_inference(args.checkpoint, args.format)
    tokenizer = open_tokenizer(model.tokenizer, explicit=False)
    cases = held_out(args.data, args.limit)
    prompts = [encode_dialog_prompt(tokenizer, messages) for messages, _ in cases]
    with torch.no_grad():
        outputs = generate(model, prompts, args.max_new_tokens, eos_id=tokenizer.stop_ids)
    answers = [tokenizer.decode(ids).strip() for ids in outputs]
    right = [a == want for a, (_, want) in zip(answers, cases, strict=True)]
    for (messages, want), answer, ok in list(zip(cases, answers, right, strict=True))[:args.show]:
        print(f"user: {messages[-1]['content']!r}\n  model: {answer!r}  expected: {want!r}  "
              f"{'ok' if ok else 'wrong'}")
    print(json.dumps({"accuracy": sum(right) / len(right), "dialogs": len(right)}))


if __name__ == "__main__":
    main()
