"""Data pipeline: tokenizer, token files, preprocessing, datasets and the DP sampler.

Modules (imported explicitly so that the preprocessing CLIs do not pull in torch):

- ``tokenizer``: the Llama SentencePiece wrapper and the model/tokenizer vocabulary check.
- ``tokenizer_trainer``: trains a SentencePiece BPE model with Llama 2's settings.
- ``sources``: reads documents from text / JSONL inputs, optionally gzip or xz compressed.
- ``indexed``: the memory-mapped token file (``.bin``) and its document index (``.idx``).
- ``preprocess``: text/JSONL -> indexed token file, in parallel, with a summary.
- ``dataset``: packed fixed-length samples, blending, train/valid split, ``collate``.
- ``sampler``: the deterministic, resumable, data-parallel batch sampler.
- ``checks``: the token files and tokenizer a run names, checked before any collective.
- ``progress_bar``: the tqdm settings every console progress bar of megallama shares.

The formats and the sampler's semantics are described in docs/DATA.md.
"""
