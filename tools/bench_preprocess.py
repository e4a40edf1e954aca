"""Benchmark preprocessing throughput against raw SentencePiece encoding on the same text.

    python tools/bench_preprocess.py [--corpus data/sotu/train.txt.gz] [--tokenizer MODEL]
                                     [--workers 1 2] [--repeat 3] [--json bench.json]

Rows (tokens/s, best of ``--repeat``, the configurations interleaved so that background
load affects all of them alike):

- ``sentencepiece 1 thread``: ``encode`` of each document in a Python loop, nothing else:
  the ceiling for one preprocessing worker.
- ``sentencepiece N threads``: sentencepiece's own batch encode over N threads (reference).
- ``preprocess W worker(s)``: ``megallama.data.preprocess`` end to end on the uncompressed
  text (read, tokenize, write ``.bin``/``.idx``/summary, start the pool), with
  ``per worker`` = tokens/s / W and ``vs raw`` = per worker / the 1-thread ceiling; the
  target is >= 0.80. ``(gz)`` rows read the gzip file directly.

The tokenizer is the real Llama 2 one from ``../shared/assets`` when present, else a demo
tokenizer (vocab 8000) trained on the corpus first. The corpus defaults to the SOTU train
split in ``data/sotu``.
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
from pathlib import Path

import sentencepiece as spm

from megallama.data.preprocess import preprocess
from megallama.data.sources import DocumentReader
from megallama.data.tokenizer_trainer import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
LLAMA_MODEL = REPO.parent / "shared" / "assets" / "llama2-tokenizer" / "tokenizer.model"
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


def _raw_encode(sp: spm.SentencePieceProcessor, docs: list[str], threads: int) -> tuple[int, float]:
    start = time.perf_counter()
    if threads == 1:
        ids = [sp.encode(d, add_bos=True, add_eos=True) for d in docs]
    else:
        ids = sp.encode(docs, add_bos=True, add_eos=True, num_threads=threads)
    seconds = time.perf_counter() - start
    return sum(map(len, ids)), seconds


def run(corpus: Path, tokenizer: Path | None, workers: list[int], repeat: int) -> dict:
    """Run the benchmark and return its results as a JSON-able dict."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as tmp:
        workdir = Path(tmp)
        plain = _plain_copy(corpus, workdir)
        if tokenizer is None:
            if LLAMA_MODEL.is_file():
                tokenizer = LLAMA_MODEL
            else:
                print("[bench] training a demo tokenizer (vocab 8000)", file=sys.stderr)
                tokenizer = train_tokenizer([plain], workdir / "demo", vocab_size=8000)
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
        docs = list(DocumentReader(plain))
        configs: list[tuple[str, tuple]] = [("sentencepiece 1 thread", ("raw", 1))]
        if cpus and cpus > 1:
            configs.append((f"sentencepiece {cpus} threads", ("raw", cpus)))
        for w in workers:
            configs.append((f"preprocess {w} worker{'s' if w > 1 else ''}", ("pp", w, plain)))
        if corpus.suffix == ".gz":
            configs.append(("preprocess 1 worker (gz)", ("pp", 1, corpus)))
        best: dict[str, dict] = {}
        for rep in range(repeat):
            for name, spec in configs:
                if spec[0] == "raw":
                    tokens, seconds = _raw_encode(sp, docs, spec[1])
                    parallel = spec[1]
                else:
                    _, w, path = spec
                    out = workdir / f"out_{w}_{rep}"
                    summary = preprocess([path], out, tokenizer, workers=w, progress=False)
                    tokens, seconds, parallel = summary["tokens"], summary["seconds"], w
                row = {"tokens": tokens, "seconds": round(seconds, 3), "parallel": parallel}
                row["tokens_per_s"] = round(tokens / seconds, 1)
                if name not in best or row["tokens_per_s"] > best[name]["tokens_per_s"]:
                    best[name] = row
                print(f"[bench] {rep + 1}/{repeat} {name}: {row['tokens_per_s']:,.0f} tok/s",
                      file=sys.stderr)  # fmt: skip
    ceiling = best["sentencepiece 1 thread"]["tokens_per_s"]
    for name, row in best.items():
        row["per_worker_tokens_per_s"] = round(row["tokens_per_s"] / row["parallel"], 1)
        row["vs_raw_per_worker"] = round(row["per_worker_tokens_per_s"] / ceiling, 3)
        if name.startswith("preprocess"):
            row["meets_target"] = row["vs_raw_per_worker"] >= TARGET
    return {
        "corpus": str(corpus),
        "tokenizer": str(tokenizer),
        "documents": len(docs),
        "cpus": cpus,
        "repeat": repeat,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "target_vs_raw_per_worker": TARGET,
        "results": best,
    }


def format_table(report: dict) -> str:
    """The results as an aligned text table."""
    lines = [
        f"corpus {report['corpus']} ({report['documents']} docs), tokenizer {report['tokenizer']}",
        f"{'configuration':<28} {'tokens':>10} {'s':>7} {'tok/s':>11} {'per worker':>11} "
        f"{'vs raw':>7}",
    ]
    for name, row in report["results"].items():
        lines.append(
            f"{name:<28} {row['tokens']:>10,} {row['seconds']:>7.2f} {row['tokens_per_s']:>11,.0f}"
            f" {row['per_worker_tokens_per_s']:>11,.0f} {row['vs_raw_per_worker']:>7.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--tokenizer", type=Path, default=None)
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
