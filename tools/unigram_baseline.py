"""Unigram cross-entropy of a validation token file under the training file's token frequencies
(add-one smoothed), in nats per token: the level a model must beat to have learned context.

    python tools/unigram_baseline.py runs/demo/data/sotu_train runs/demo/data/sotu_val
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from megallama.data.indexed import IndexedTokens


def unigram_nats(train_prefix: str, valid_prefix: str) -> float:
    train, valid = IndexedTokens(train_prefix), IndexedTokens(valid_prefix)
    vocab = max(train.vocab_size, valid.vocab_size)
    counts = np.bincount(np.asarray(train.tokens, dtype=np.int64), minlength=vocab) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[np.asarray(valid.tokens, dtype=np.int64)].mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("train")
    p.add_argument("valid")
    args = p.parse_args()
    print(json.dumps({"unigram_nats_per_token": round(unigram_nats(args.train, args.valid), 4)}))


if __name__ == "__main__":
    main()
