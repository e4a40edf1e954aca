"""Data pipeline: tokenizer, token files, preprocessing, datasets and the DP sampler.

Modules (imported explicitly so that the preprocessing CLIs do not pull in torch):

- ``tokenizer``: one interface, ``Tokenizer(path)`` choosing from the file: the Llama 2
  SentencePiece wrapper here, Llama 3's tiktoken BPE in ``tiktoken_bpe``; the model/tokenizer
  vocabulary check. ``hf_tokenizer``: HF ``tokenizer.json`` files from a tiktoken file.
- ``tokenizer_trainer``: trains a SentencePiece BPE model with Llama 2's settings.
- ``sources``: reads documents from text / JSONL inputs, optionally gzip or xz compressed.
- ``indexed``: the memory-mapped token file (``.bin``), its document index (``.idx``) and the
  optional per-token loss mask of chat data (``.mask``).
- ``chat``: the Llama 2 chat format (Llama 3's in ``chat_llama3``, chosen by the tokenizer):
  dialogs -> token ids and loss mask (``encode_dialog``), and the prompt of a dialog for
  generation (``encode_dialog_prompt``): one definition for both.
- ``encoding``: preprocessing's chunk encoding, overlong limits and worker pool.
- ``preprocess``: text/JSONL/chat JSONL -> indexed token file, in parallel, with a summary.
- ``dataset``: packed fixed-length samples, blending, train/valid split, ``collate``.
- ``packing``: ``data.packing`` (concat / documents / padded) and the loss mask: training windows,
  their targets and segments, and the micro-batches they collate to.
- ``sampler``: the deterministic, resumable, data-parallel batch sampler.
- ``checks``: the token files and tokenizer a run names, checked before any collective.
- ``progress_bar``: the tqdm settings every console progress bar of megallama shares.

The formats and the sampler's semantics are described in docs/DATA.md.
"""
