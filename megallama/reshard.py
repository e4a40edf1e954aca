"""``megallama-reshard``: convert Llama 2 checkpoints between Meta consolidated, Hugging Face and
megallama layouts at any TP/PP, streaming one tensor at a time (see docs/RESHARD.md).

    megallama-reshard --src meta:llama-2-7b --dst hf:llama-2-7b-hf --tokenizer tokenizer.model
    megallama-reshard --src hf:llama-2-7b-hf --dst megallama:ckpt/7b-tp2pp2 --tp 2 --pp 2
    megallama-reshard --src megallama:run/checkpoints/step_00001000 --dst meta:out --mp 1
"""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError
from megallama.config.arguments import positive_int, report_error

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a byte count -> bytes (decimal units, as transformers)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 5GB or 500MB")
    size = int(float(m.group(1)) * _UNITS[m.group(2)])
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1 byte")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megallama-reshard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="FORMAT:PATH",
                   help="meta:DIR (consolidated.NN.pth + params.json), hf:DIR, megallama:DIR")
    p.add_argument("--dst", required=True, metavar="FORMAT:PATH", help="new directory to write")
    p.add_argument("--tp", type=positive_int, default=1, help="megallama output: tensor-parallel size")
    p.add_argument("--pp", type=positive_int, default=1, help="megallama output: pipeline stages")
    p.add_argument("--mp", type=positive_int, default=None,
                   help="meta output: consolidated shards (default 1 for 7B, 2 for 13B, 8 for 70B)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="cast every tensor (required when the cast loses information)")
    p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9,
                   help="hf output: largest safetensors shard (default 5GB)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.model (or an HF tokenizer directory) to ship with the output")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="megallama output: sequence length for the trainer's stage cuts "
                        "(default max_seq_len; only decides which file holds which layer)")
    p.add_argument("--partition-method", choices=["balanced", "uniform"], default="balanced",
                   help="megallama output: stage cuts, as the trainer's parallel.partition_method "
                        "(only decides which file holds which layer)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # imported after parsing so that --help answers without loading torch and safetensors
    from megallama.checkpoint.convert import convert

    # SIGTERM (a scheduler, kill) unwinds like Ctrl-C: the temporary output is removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        report = convert(args.src, args.dst, tp=args.tp, pp=args.pp, mp=args.mp, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                         seq_len=args.seq_len, partition_method=args.partition_method,
                         progress=not args.no_progress)
    except (CheckpointError, ConfigError) as e:
        report_error("megallama-reshard", e)
        return 2
    except OSError as e:  # the destination: read-only, full, not a directory...
        where = e.filename or args.dst
        report_error("megallama-reshard", f"{where}: {e.strerror or e} (nothing was written to "
                     f"{args.dst.partition(':')[2]})")
        return 2
    gbs = report["bytes"] / 1e9
    print(f"wrote {args.dst}: {report['tensors']} tensors, {gbs:.2f} GB in "
          f"{report['seconds']:.1f} s ({gbs / max(report['seconds'], 1e-9):.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
