"""Benchmark preprocessing throughput against the raw tokenizer library on the same text.

    python tools/bench_preprocess.py [--corpus data/sotu/train.txt.gz] [--tokenizer MODEL ...]
                                     [--workers 1 2] [--repeat 3] [--json bench.json]

Rows per tokenizer (tokens/s, best of ``--repeat``, the configurations interleaved so that
background load affects all of them alike):

- ``sentencepiece 1 thread`` (Llama 2) / ``tiktoken 1 thread`` (Llama 3): the library's encode
  of each document in a Python loop, nothing else: the ceiling for one preprocessing worker.
- ``sentencepiece N threads``: sentencepiece's own batch encode over N threads (reference).
- ``preprocess W worker(s)``: ``megallama.data.preprocess`` end to end on the uncompressed
  text (read, tokenize, write ``.bin``/``.idx``/summary, start the pool), with
  ``per worker`` = tokens/s / W and ``vs raw`` = per worker / the 1-thread ceiling; the
  target is >= 0.80. ``(gz)`` rows read the gzip file directly.

The tokenizers are the real Llama 2 and Llama 3 ones from ``../shared/assets`` when present
(else a demo SentencePiece tokenizer, vocab 8000, trained on the corpus first), or those given
with ``--tokenizer``. The corpus defaults to the SOTU train split in ``data/sotu``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import sentencepiece as spm

from megallama.data.preprocess import preprocess
from megallama.data.sources import DocumentReader
from megallama.data.tokenizer import Tokenizer
from megallama.data.tokenizer_trainer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO.parent / "shared" / "assets"
LLAMA_MODEL = ASSETS / "llama2-tokenizer" / "tokenizer.model"
LLAMA3_MODEL = ASSETS / "llama3-tokenizer" / "tokenizer.model"
DEFAULT_CORPUS = REPO / "data" / "sotu" / "train.txt.gz"
TARGET = 0.80


def _plain_copy(corpus: Path, workdir: Path) -> Path:
    """The corpus as an uncompressed file (raw encoding and preprocessing read the same text)."""
    if corpus.suffix != ".gz":
        return corpus
    plain = workdir / corpus.name.removesuffix(".gz")
    with gzip.open(corpus, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return plain


def _raw_encoder(tokenizer: Path) -> tuple[str, Callable[[list[str], int], list]]:
    """(library name, encode(docs, threads)) of the raw library under ``tokenizer``, with BOS
    and EOS as preprocessing adds them."""
    tok = Tokenizer(tokenizer)
    if tok.chat_format == "llama3":
        enc, bos, eos = tok.encoding, tok.bos_id, tok.eos_id  # tiktoken.Encoding

        def tiktoken_encode(docs: list[str], threads: int) -> list:
            if threads > 1:
                ids = enc.encode_ordinary_batch(docs, num_threads=threads)
                return [[bos, *one, eos] for one in ids]
            return [[bos, *enc.encode_ordinary(d), eos] for d in docs]

        return "tiktoken", tiktoken_encode
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))

    def sp_encode(docs: list[str], threads: int) -> list:
        if threads == 1:
            return [sp.encode(d, add_bos=True, add_eos=True) for d in docs]
        return sp.encode(docs, add_bos=True, add_eos=True, num_threads=threads)

    return "sentencepiece", sp_encode


def _raw_encode(encode: Callable[[list[str], int], list], docs: list[str], threads: int,
                ) -> tuple[int, float]:
    start = time.perf_counter()
    ids = encode(docs, threads)
    seconds = time.perf_counter() - start
    return sum(map(len, ids)), seconds


def _default_tokenizers(plain: Path, workdir: Path) -> list[Path]:
    found = [p for p in (LLAMA_MODEL, LLAMA3_MODEL) if p.is_file()]
    if found:
        return found
    print("[bench] training a demo tokenizer (vocab 8000)", file=sys.stderr)
    return [train_tokenizer([plain], workdir / "demo", vocab_size=8000)]


def run(corpus: Path, tokenizers: list[Path] | None, workers: list[int], repeat: int) -> dict:
    """Run the benchmark for each tokenizer and return the results as a JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        workdir = Path(tmp)
        plain = _plain_copy(corpus, workdir)
        docs = list(DocumentReader(plain))
        reports = [_run_one(corpus, plain, docs, tokenizer, workers, repeat, workdir)
                   for tokenizer in tokenizers or _default_tokenizers(plain, workdir)]
    return {"corpus": str(corpus), "documents": len(docs), "repeat": repeat,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "target_vs_raw_per_worker": TARGET, "tokenizers": reports}


def _run_one(corpus: Path, plain: Path, docs: list[str], tokenizer: Path, workers: list[int],
             repeat: int, workdir: Path) -> dict:
    """The rows of one tokenizer."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    library, encode = _raw_encoder(tokenizer)
    raw_name = f"{library} 1 thread"
    configs: list[tuple[str, tuple]] = [(raw_name, ("raw", 1))]
    if cpus and cpus > 1:
        configs.append((f"{library} {cpus} threads", ("raw", cpus)))
    for w in workers:
        configs.append((f"preprocess {w} worker{'s' if w > 1 else ''}", ("pp", w, plain)))
    if corpus.suffix == ".gz":
        configs.append(("preprocess 1 worker (gz)", ("pp", 1, corpus)))
    best: dict[str, dict] = {}
    for rep in range(repeat):
        for name, spec in configs:
            if spec[0] == "raw":
                tokens, seconds = _raw_encode(encode, docs, spec[1])
                parallel = spec[1]
            else:
                _, w, path = spec
                out = workdir / f"out_{library}_{w}_{rep}"
                summary = preprocess([path], out, tokenizer, workers=w, progress=False)
                tokens, seconds, parallel = summary["tokens"], summary["seconds"], w
            row = {"tokens": tokens, "seconds": round(seconds, 3), "parallel": parallel}
            row["tokens_per_s"] = round(tokens / seconds, 1)
            if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                best[name] = row
            print(f"[bench] {rep + 1}/{repeat} {name}: {row['tokens_per_s']:,.0f} tok/s",
                  file=sys.stderr)  # fmt: skip
    ceiling = best[raw_name]["tokens_per_s"]
    for name, row in best.items():
        row["per_worker_tokens_per_s"] = round(row["tokens_per_s"] / row["parallel"], 1)
        row["vs_raw_per_worker"] = round(row["per_worker_tokens_per_s"] / ceiling, 3)
        if name.startswith("preprocess"):
            row["meets_target"] = row["vs_raw_per_worker"] >= TARGET
    return {"tokenizer": str(tokenizer), "library": library, "cpus": cpus, "results": best}


def format_table(report: dict) -> str:
    """The results as an aligned text table, one block per tokenizer."""
    lines = [f"corpus {report['corpus']} ({report['documents']} docs)"]
    for one in report["tokenizers"]:
        lines += [
            f"tokenizer {one['tokenizer']} ({one['library']})",
            f"{'configuration':<28} {'tokens':>10} {'s':>7} {'tok/s':>11} {'per worker':>11} "
            f"{'vs raw':>7}",
        ]
        for name, row in one["results"].items():
            lines.append(
                f"{name:<28} {row['tokens']:>10,} {row['seconds']:>7.2f} "
                f"{row['tokens_per_s']:>11,.0f} {row['per_worker_tokens_per_s']:>11,.0f} "
                f"{row['vs_raw_per_worker']:>7.0%}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, nargs="+", default=None,
                        help="tokenizer.model file(s) (default: Llama 2's and Llama 3's)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    report = run(args.corpus, args.tokenizer, args.workers, args.repeat)
    print(format_table(report))
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
