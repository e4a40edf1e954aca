"""``python -m megallama.generate --checkpoint DIR --prompt TEXT ...`` -- text from a checkpoint.

Runs at any tensor- and pipeline-parallel size: ``torchrun --nproc-per-node N`` gives tp = N,
pp = 1 by default; ``--pp P`` cuts the model into P stages (tp = N / P unless ``--tp`` says so;
tp * pp must equal N). The model is a megallama weights checkpoint (a step directory, a
checkpoints/ root or a run directory) or, with ``--format meta|hf``, a Meta or Hugging Face
directory streamed through the reshard readers. A ``tokenizer.model`` beside the weights (or the
run's tokenizer) is used unless ``--tokenizer`` names another.

KV-cache decoding of a batch of left-padded prompts, greedy (``--temperature 0``) or sampled
(temperature, top-k, top-p, seeded identically on every rank; see
:mod:`megallama.inference.generation`). Only rank 0 prints: a single prompt is streamed token by
token, a batch is printed at the end; the speed goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError
from megallama.config.arguments import (
    non_negative_float,
    non_negative_int,
    positive_int,
    probability,
)
from megallama.data.chat import find_chat_tag
from megallama.data.tokenizer import Tokenizer, TokenizerError, check_vocab
from megallama.inference.generation import (
    GenerationError,
    Sampling,
    chat_prompt,
    check_prompts,
    generate,
)
from megallama.inference.loader import (
    FORMATS,
    PRECISIONS,
    CheckpointInfo,
    check_layout,
    inference_device,
    inspect_checkpoint,
    load_for_inference,
    open_tokenizer,
)
from megallama.parallel.runtime import run_command, world_info

PROG = "megallama.generate"
INPUT_ERRORS = (ConfigError, CheckpointError, TokenizerError, GenerationError, OSError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="megallama step/checkpoints/run directory, or a Meta/HF dir with --format")
    p.add_argument("--format", default="megallama", choices=list(FORMATS))
    p.add_argument("--tokenizer", help="tokenizer.model (default: the directory's / the run's)")
    p.add_argument("--prompt", action="append", default=[], help="repeat for a batch")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--chat", action="store_true",
                   help="each prompt is a user turn in Llama 2's chat format ([INST] ... [/INST])")
    p.add_argument("--system", help="system prompt for --chat (<<SYS>> block)")
    p.add_argument("--allow-chat-tags", action="store_true",
                   help="with --chat: keep [INST], [/INST], <<SYS>>, <</SYS>> in a prompt as text "
                        "(refused by default, as Meta's chat_completion does)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="0: no top-k filter")
    p.add_argument("--top-p", type=probability, default=1.0, help="in (0, 1]; 1: no filter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute the sequence every step")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS))
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-stream", action="store_true", help="print completions only at the end")
    p.add_argument("--tp", type=positive_int,
                   help="tensor-parallel size (default: world size / --pp)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline stages (default 1)")
    return p


class _Streamer:
    """Prints one sequence's text as it grows. It decodes prompt and continuation together and
    prints what is new, because SentencePiece drops the leading space of a first piece decoded
    alone and byte pieces only become a character once all of them are there."""

    def __init__(self, tokenizer: Tokenizer, prompt: list[int], stop_ids: tuple[int, ...]) -> None:
        self.tokenizer, self.stop_ids = tokenizer, stop_ids
        self.ids = list(prompt)
        self.printed = tokenizer.decode(self.ids)
        self.stopped = False
        sys.stdout.write(self.printed)
        sys.stdout.flush()

    def __call__(self, nxt: torch.Tensor) -> None:
        tok = int(nxt[0])
        if self.stopped or tok in self.stop_ids:
            self.stopped = True
            return
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


@dataclass
class _Job:
    """A checked command line: everything resolved before torch.distributed starts."""

    info: CheckpointInfo
    tokenizer: Tokenizer
    prompts: list[list[int]]
    sampling: Sampling
    tp: int
    pp: int
    device: torch.device


def _layout(args: argparse.Namespace, world: int, info: CheckpointInfo) -> tuple[int, int]:
    """(tp, pp): tp * pp must be the world size (generation has no data parallelism)."""
    pp = args.pp
    tp = args.tp if args.tp is not None else max(1, world // pp)
    check_layout(info.cfg, tp, pp, world, exact=True)
    return tp, pp


def _read_prompt_file(path: Path) -> list[tuple[str, str]]:
    """``(where, line)`` of the non-blank lines of ``--prompt-file``; one clear error for a file
    that cannot be read or is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise GenerationError(f"--prompt-file {path}: {e.strerror}; give a UTF-8 text file with "
                              "one prompt per line") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise GenerationError(f"--prompt-file {path}: line {line} is not UTF-8 (byte "
                              f"0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
                              ) from None
    return [(f"--prompt-file {path} line {n}", line)
            for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _check_options(args: argparse.Namespace) -> None:
    """Options that only mean something with ``--chat``: silently ignoring them would generate
    from another prompt than the one asked for."""
    for option, given in (("--system", args.system is not None),
                          ("--allow-chat-tags", args.allow_chat_tags)):
        if given and not args.chat:
            raise GenerationError(f"{option} applies to chat prompts: add --chat (or drop "
                                  f"{option})")


def _utf8(where: str, text: str) -> str:
    """``text``, or a GenerationError naming ``where`` when it is not valid UTF-8: Python turns
    the bytes of a command-line argument that are not UTF-8 into lone surrogates, which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise GenerationError(f"{where} is not valid UTF-8 ({what} at character {e.start}); "
                              "give UTF-8 text") from None
    return text


def _prompt_texts(args: argparse.Namespace, chat_format: str = "llama2") -> list[tuple[str, str]]:
    """``(where, text)`` of every prompt, where naming the option it came from; blank prompts,
    text that is not UTF-8 and (with ``--chat``) chat tags are errors here, before the chat
    format wraps a prompt into text that is never blank."""
    many = len(args.prompt) > 1
    texts = [(f"--prompt #{n}" if many else "--prompt", t) for n, t in enumerate(args.prompt, 1)]
    texts = [(where, _utf8(where, t)) for where, t in texts]
    if args.prompt_file:
        texts += _read_prompt_file(Path(args.prompt_file))
    if not texts:
        raise GenerationError("give at least one --prompt or --prompt-file")
    for where, text in texts:
        if not text.strip():
            raise GenerationError(f"{where} is empty (blank text); give non-blank text")
    if args.chat and not args.allow_chat_tags:
        system = [] if args.system is None else [("--system", args.system)]
        for where, text in [*system, *texts]:
            tag = find_chat_tag(text, chat_format)
            if tag is not None and chat_format == "llama3":
                raise GenerationError(
                    f"{where} contains {tag!r}, a special token of the Llama 3 chat format that "
                    "--chat places itself (in a message it is plain text); remove it, or pass "
                    "--allow-chat-tags to keep it as text")
            if tag is not None:
                raise GenerationError(
                    f"{where} contains {tag!r}, a tag of the Llama 2 chat format that --chat adds "
                    "itself (Meta's chat_completion refuses it in a message); remove it, or pass "
                    "--allow-chat-tags to keep it as text")
    return texts


def _prompts(args: argparse.Namespace, tokenizer: Tokenizer) -> list[list[int]]:
    if args.system is not None:
        _utf8("--system", args.system)
    texts = [text for _, text in _prompt_texts(args, tokenizer.chat_format)]
    if args.chat:  # the format of megallama.data.chat, as chat training data is tokenized
        return [chat_prompt(tokenizer, t, args.system, allow_tags=args.allow_chat_tags)
                for t in texts]
    return [tokenizer.encode(t, bos=True) for t in texts]


def _prepare(args: argparse.Namespace, world: int) -> _Job:
    """Every check that needs no collective, so that bad input stops every rank alike."""
    _check_options(args)
    device = inference_device(args.device)
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    info = inspect_checkpoint(Path(args.checkpoint), args.format)
    tp, pp = _layout(args, world, info)
    tok_path = Path(args.tokenizer) if args.tokenizer else info.tokenizer
    if tok_path is None:
        raise GenerationError("no tokenizer: pass --tokenizer PATH/tokenizer.model")
    tokenizer = open_tokenizer(tok_path, explicit=args.tokenizer is not None)
    check_vocab(tokenizer.vocab_size, info.cfg.vocab_size, tok_path)
    prompts = _prompts(args, tokenizer)
    check_prompts(prompts, args.max_new_tokens, info.cfg)
    return _Job(info, tokenizer, prompts, sampling, tp, pp, device)


def _run(args: argparse.Namespace, job: _Job, rank: int) -> None:
    model = load_for_inference(job.info.path, args.format, tp=job.tp, pp=job.pp,
                               dtype=PRECISIONS[args.precision], device=job.device)
    tokenizer, prompts = job.tokenizer, job.prompts
    stream = rank == 0 and len(prompts) == 1 and not args.no_stream
    streamer = _Streamer(tokenizer, prompts[0], tokenizer.stop_ids) if stream else None
    t0 = time.perf_counter()
    outs = generate(model, prompts, args.max_new_tokens, job.sampling, tokenizer.stop_ids,
                    use_cache=not args.no_cache, on_step=streamer)
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return
    if stream:
        print(flush=True)
    else:
        for prompt, ids in zip(prompts, outs, strict=True):
            print(f"{tokenizer.decode(prompt + ids)}\n", flush=True)
    n = sum(len(o) for o in outs)
    print(f"[{n} tokens in {elapsed:.2f} s, {n / max(elapsed, 1e-9):.1f} tokens/s]",
          file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank, world = world_info()

    def body() -> int:
        job = _prepare(args, world)  # before any collective: bad input fails on all ranks
        _run(args, job, rank)  # load errors are agreed: every rank raises the same
        return 0

    return run_command(PROG, body, INPUT_ERRORS)


if __name__ == "__main__":
    raise SystemExit(main())
