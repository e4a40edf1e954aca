"""Document attention's kernel choice (MEGALLAMA_ATTENTION) and the BlockMask built from the
segments without a dense mask. Compiled FlexAttention itself runs against the reference in
tests/distributed/test_compiled_paths.py (one launch for every compiled path)."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask

from megallama.config import ConfigError
from megallama.model import documents

TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
          "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _torch_block_mask(segments: torch.Tensor, block: int):
    """torch's own BlockMask of the rule (it evaluates the mask on every [q, kv] pair)."""
    def mask_mod(b, h, q, kv):
        return (segments[b, q] == segments[b, kv]) & (kv <= q)
    seq = segments.shape[-1]
    return create_block_mask(mask_mod, B=segments.shape[0], H=None, Q_LEN=seq, KV_LEN=seq,
                             device="cpu", BLOCK_SIZE=block)


@pytest.mark.parametrize("seq,block", [(512, 128), (500, 128), (100, 16), (37, 8)])
def test_block_mask_from_segments_equals_torchs(seq, block):
    """Every table (partial and full blocks, key and query side) equals create_block_mask's, for
    documents that start anywhere, one document per row, and a length cut mid-block."""
    g = torch.Generator().manual_seed(seq)
    starts = torch.rand(4, seq, generator=g) < 0.03
    starts[:, 0] = True
    segments = starts.long().cumsum(-1)
    segments[2] = 7  # one document: full blocks below the diagonal
    segments[3, : seq // 2], segments[3, seq // 2:] = 0, 1  # an edge on a block boundary
    want, got = _torch_block_mask(segments, block), documents.block_mask(segments, block)
    for name in TABLES:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.full_kv_num_blocks.sum() > 0 and got.kv_num_blocks.sum() > 0


def test_block_mask_of_unordered_segments_keeps_every_visible_pair():
    """Segment ids that do not increase (not what packing writes) still mark every block that
    holds a visible pair (conservatively): the kernel masks element-wise inside them."""
    segments = torch.tensor([[0] * 8 + [1] * 8 + [0] * 8 + [2] * 8])
    want, got = _torch_block_mask(segments, 8), documents.block_mask(segments, 8)
    dense = torch.zeros(4, 4, dtype=torch.bool)
    for num, idx in ((want.kv_num_blocks, want.kv_indices),
                     (want.full_kv_num_blocks, want.full_kv_indices)):
        for row in range(4):
            dense[row, idx[0, 0, row, : num[0, 0, row]]] = True
    mine = torch.zeros(4, 4, dtype=torch.bool)
    for row in range(4):
        for num, idx in ((got.kv_num_blocks, got.kv_indices),
                         (got.full_kv_num_blocks, got.full_kv_indices)):
            mine[row, idx[0, 0, row, : num[0, 0, row]]] = True
    assert (mine | ~dense).all()  # every visible block pair of torch's is one of ours
    assert mine[2, 0] and not mine[2, 1]  # the third block's document began in the first


def test_block_mask_is_small_at_long_sequences():
    """One 32768-token window: the BlockMask's tables hold O((s / 128)^2) int32s, 1/1000 of the
    dense bool mask, and are built without an [s, s] tensor."""
    seq = 32768
    segments = (torch.arange(seq) // 3000)[None]
    mask = documents.block_mask(segments)
    nbytes = sum(getattr(mask, n).nbytes for n in TABLES)
    assert nbytes < seq * seq // 1000, nbytes
    assert mask.kv_num_blocks.shape == (1, 1, seq // documents.BLOCK)


def test_kernel_rule(monkeypatch):
    monkeypatch.delenv(documents.ENV, raising=False)
    assert documents.attention_kernel(torch.device("cpu")) == "sdpa"
    assert documents.attention_kernel(torch.device("cuda")) == "flex"
    monkeypatch.setenv(documents.ENV, " FLEX ")
    assert documents.attention_kernel(torch.device("cpu")) == "flex"
    monkeypatch.setenv(documents.ENV, "sdpa")
    assert documents.attention_kernel(torch.device("cuda")) == "sdpa"
    monkeypatch.setenv(documents.ENV, "dense")
    with pytest.raises(ConfigError, match=r"MEGALLAMA_ATTENTION='dense': choose one of"):
        documents.attention_kernel(torch.device("cpu"))
