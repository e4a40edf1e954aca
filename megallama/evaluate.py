"""``python -m megallama.evaluate --checkpoint DIR --data FILE...`` -- validation loss at any layout.

Prints one JSON line ``{"val_loss": ..., "perplexity": ..., "tokens": ..., "windows": ...}`` on
stdout (rank 0): the loss averaged over ``tokens`` target tokens of ``windows`` windows. Every
window is scored once, made as the trainer makes it (``--packing``, the loss mask of chat data),
so the number equals the trainer's validation of the same checkpoint and set
(``trainer.eval_iters=null``), and TP/PP/DP change nothing but round-off.
Text inputs (.txt/.jsonl, optionally compressed) are tokenized with the checkpoint's tokenizer
exactly as ``megallama-preprocess`` does; preprocessed token files are given by their prefix.
The model is loaded for inference only (:mod:`megallama.inference`): no optimizer, no DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megallama.config.arguments import non_negative_int, positive_int
from megallama.config.validate import PACKINGS
from megallama.inference.evaluation import INPUT_ERRORS, EvalRequest, evaluate, plan_evaluation
from megallama.inference.loader import FORMATS, PRECISIONS
from megallama.parallel.runtime import run_command, world_info

PROG = "megallama.evaluate"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a step directory, a checkpoints/ root (its latest) or a run directory; "
                        "a Meta/HF directory with --format")
    p.add_argument("--format", default="megallama", choices=list(FORMATS))
    p.add_argument("--data", nargs="+", required=True, help="text/JSONL files or token-file prefixes")
    p.add_argument("--tokenizer",
                   help="tokenizer.model for text inputs (default: beside the weights, else the run's)")
    p.add_argument("--seq-len", type=positive_int, help="default: the run's data.seq_len")
    p.add_argument("--tp", type=positive_int, default=1)
    p.add_argument("--pp", type=positive_int, default=1)
    p.add_argument("--batch-size", type=positive_int, default=8, help="sequences per global batch")
    p.add_argument("--micro-batch-size", type=positive_int, default=1)
    p.add_argument("--max-batches", type=non_negative_int, default=0, help="0: the whole data")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--packing", choices=list(PACKINGS),
                   help="windows as the trainer's data.packing makes them (default: the run's, "
                        "else concat); documents/padded attend within each document")
    p.add_argument("--no-loss-mask", dest="loss_mask", action="store_false", default=None,
                   help="score every token even where the token files have a loss mask (chat "
                        "data; default: the run's data.loss_mask, else use the mask)")
    return p


def _request(args: argparse.Namespace) -> EvalRequest:
    return EvalRequest(
        checkpoint=Path(args.checkpoint), data=list(args.data), fmt=args.format,
        tokenizer=Path(args.tokenizer) if args.tokenizer else None, seq_len=args.seq_len,
        tp=args.tp, pp=args.pp, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, max_batches=args.max_batches,
        precision=args.precision, device=args.device, packing=args.packing,
        loss_mask=args.loss_mask)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = world_info()

    def body() -> int:
        plan = plan_evaluation(_request(args), world)  # before any collective: fails on all ranks
        result = evaluate(plan)
        if rank == 0:
            print(json.dumps(result), flush=True)
        return 0

    return run_command(PROG, body, INPUT_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
