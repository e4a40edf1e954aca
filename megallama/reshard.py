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

PROG = "megallama-reshard"
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


def checkpoint_spec(text: str) -> str:
    """``--src``/``--dst``: ``FORMAT:PATH`` with a known format, else a usage error naming the
    option (checked by the converter's own parser, imported here only when an option is given)."""
    from megallama.interop.convert import parse_spec

    try:
        parse_spec(text)
    except CheckpointError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, metavar="FORMAT:PATH", type=checkpoint_spec,
                   help="meta:DIR (consolidated.NN.pth + params.json), hf:DIR, megallama:DIR")
    p.add_argument("--dst", required=True, metavar="FORMAT:PATH", type=checkpoint_spec,
                   help="new directory to write")
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


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (a scheduler, kill) unwinds like Ctrl-C, so the temporary output is removed; the
    exit status is the shell's for a signal, 128 + 15."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 written; 2 a usage or input error (one line on stderr naming the file or
    option); 130/143 interrupted by SIGINT/SIGTERM. Unexpected errors keep their traceback (1)."""
    args = build_parser().parse_args(argv)
    # imported after parsing so that --help answers without loading torch and safetensors
    from megallama.interop.convert import convert

    dst = args.dst.partition(":")[2]
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        report = convert(args.src, args.dst, tp=args.tp, pp=args.pp, mp=args.mp, dtype=args.dtype,
                         max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                         seq_len=args.seq_len, partition_method=args.partition_method,
                         progress=not args.no_progress)
    except (CheckpointError, ConfigError) as e:
        report_error(PROG, e)
        return 2
    except OSError as e:  # the destination: read-only, full, not a directory...
        where = e.filename or args.dst
        report_error(PROG, f"{where}: {e.strerror or e} (nothing was written to {dst})")
        return 2
    except KeyboardInterrupt:
        report_error(PROG, f"interrupted; the temporary output was removed, nothing was written "
                     f"to {dst}")
        return 128 + signal.SIGINT
    except SystemExit as e:
        if e.code == 128 + signal.SIGTERM:
            report_error(PROG, f"terminated (SIGTERM); the temporary output was removed, nothing "
                         f"was written to {dst}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    gbs = report["bytes"] / 1e9
    print(f"wrote {args.dst}: {report['tensors']} tensors, {gbs:.2f} GB in "
          f"{report['seconds']:.1f} s ({gbs / max(report['seconds'], 1e-9):.2f} GB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
