"""Packing modes (concat, documents, padded), their labels and segments, and the document mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megallama.config import preset
from megallama.data.dataset import PackedDataset
from megallama.data.indexed import IndexedWriter
from megallama.data.packing import DocumentWindows, collate_windows, windows_for
from megallama.model.documents import document_attention, document_positions
from megallama.model.llama import Transformer

DOC_LENGTHS = [5, 3, 9, 20, 1, 2]
SEQ = 8  # windows of 9 tokens


@pytest.fixture()
def token_file(tmp_path):
    """Documents whose tokens are 1000 * (doc + 1) + position, so every token says where it is."""
    prefix = tmp_path / "docs"
    with IndexedWriter(prefix, vocab_size=1 << 15) as w:
        for d, n in enumerate(DOC_LENGTHS):
            w.add_document(np.arange(n) + 1000 * (d + 1))
    return prefix


def _all_labels(dataset) -> list[int]:
    labels = []
    for i in range(len(dataset)):
        _, lab, *_ = collate_windows([dataset[i]])
        labels += [int(x) for x in lab[0] if x != -100]
    return labels


def test_documents_packing_trains_every_token_once_within_its_document(token_file):
    windows = windows_for(PackedDataset(token_file, SEQ), "documents", use_mask=True)
    assert isinstance(windows, DocumentWindows)
    # pieces 5, 3 | 9 | 9, 9, 4 of the 20-token document (overlapping by one) | 2 (the 1-token
    # document has no target and is dropped); 5 + 3 <= 9 share a window, 4 + 2 too
    assert len(windows) == 5
    tokens, labels, segments = collate_windows([windows[0]])
    assert tokens[0, :8].tolist() == [1000, 1001, 1002, 1003, 1004, 2000, 2001, 2002]
    assert segments[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    # the label at the last token of document 0 would be document 1's first token: excluded
    assert labels[0].tolist() == [1001, 1002, 1003, 1004, -100, 2001, 2002, -100]
    # every token but each document's first is a target exactly once, in order
    want = [1000 * (d + 1) + i for d, n in enumerate(DOC_LENGTHS) for i in range(1, n)]
    assert _all_labels(windows) == want


def test_padded_packing_has_one_document_per_window(token_file):
    windows = windows_for(PackedDataset(token_file, SEQ), "padded", use_mask=True)
    assert len(windows) == 7  # 5 | 3 | 9 | 9 | 9 | 4 | 2
    tokens, labels, segments = collate_windows([windows[1]])
    assert segments[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]  # the padding is its own segment
    assert labels[0].tolist() == [2001, 2002] + [-100] * 6
    assert _all_labels(windows) == [1000 * (d + 1) + i for d, n in enumerate(DOC_LENGTHS)
                                    for i in range(1, n)]


def test_concat_packing_is_unchanged_and_applies_a_loss_mask(token_file):
    packed = PackedDataset(token_file, SEQ)
    assert windows_for(packed, "concat", use_mask=True) is packed  # no mask file: as before
    mask = np.zeros(sum(DOC_LENGTHS), dtype=np.uint8)
    mask[3:7] = 1
    mask.tofile(f"{token_file}.mask")
    windows = windows_for(PackedDataset(token_file, SEQ), "concat", use_mask=True)
    tokens, labels = collate_windows([windows[0]])
    assert tokens[0].tolist() == np.asarray(packed[0][:-1]).tolist()
    # label t is token t + 1: a target when mask[t + 1]
    assert labels[0].tolist() == [-100, -100, 1003, 1004, 2000, 2001, -100, -100]
    unmasked = windows_for(PackedDataset(token_file, SEQ), "concat", use_mask=False)
    assert unmasked is not windows and collate_windows([unmasked[0]])[1].min() >= 0


def test_documents_packing_respects_the_loss_mask(token_file):
    mask = np.zeros(sum(DOC_LENGTHS), dtype=np.uint8)
    mask[[2, 4, 6, 7]] = 1  # doc 0 tokens 2 and 4; doc 1 tokens 1 and 2
    mask.tofile(f"{token_file}.mask")
    windows = windows_for(PackedDataset(token_file, SEQ), "documents", use_mask=True)
    _, labels, _ = collate_windows([windows[0]])
    assert labels[0].tolist() == [-100, 1002, -100, 1004, -100, 2001, 2002, -100]


def test_document_positions_restart_at_each_segment():
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [4, 4, 4, 4, 4, 4, 4, 4]])
    assert document_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2],
                                                      list(range(8))]


def test_document_attention_reference_shares_kv_heads():
    """The reference kernel (SDPA under the dense mask) with 2 KV heads for 4 query heads (GQA
    in the kernel) equals it with K/V repeated per query head; compiled FlexAttention is checked
    against it in tests/distributed/test_compiled_paths.py."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 12, 8, generator=g)
    k, v = (torch.randn(2, 2, 12, 8, generator=g) for _ in range(2))
    segments = torch.tensor([[0] * 3 + [1] * 9, [0] * 5 + [1] * 2 + [2] * 5])
    dense = document_attention(q, k, v, segments, kernel="sdpa")
    repeated = document_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                  segments, kernel="sdpa")
    assert (dense - repeated).abs().max() < 1e-6
    # the first document is causal attention on its own
    alone = torch.nn.functional.scaled_dot_product_attention(
        q[:1, :, :3], k[:1, :, :3].repeat_interleave(2, 1), v[:1, :, :3].repeat_interleave(2, 1),
        is_causal=True)
    assert (dense[:1, :, :3] - alone).abs().max() < 1e-6


def test_packed_documents_equal_documents_alone_with_activation_checkpointing():
    cfg = preset("tiny_gqa", vocab_size=101)
    model = Transformer(cfg, seed=3, activation_checkpointing=True)
    a, b = torch.randint(0, 101, (1, 5)), torch.randint(0, 101, (1, 7))
    segments = torch.tensor([[0] * 5 + [1] * 7])
    packed = model(torch.cat([a, b], 1), segments=segments)
    packed.sum().backward()  # through the checkpointed blocks
    with torch.no_grad():
        assert (packed[:, :5] - model(a)).abs().max() < 1e-5
        assert (packed[:, 5:] - model(b)).abs().max() < 1e-5


def test_a_blend_of_plain_and_masked_windows_collates(token_file, tmp_path):
    """data.train=[text, chat] under concat packing: plain windows train on every token, masked
    ones on their mask, in one micro-batch."""
    plain = PackedDataset(token_file, SEQ)
    mask = np.zeros(sum(DOC_LENGTHS), dtype=np.uint8)
    mask.tofile(f"{token_file}.mask")  # nothing is a target
    masked = windows_for(PackedDataset(token_file, SEQ), "concat", use_mask=True)
    tokens, labels = collate_windows([plain[0], masked[0]])
    assert (labels[0] >= 0).all() and (labels[1] == -100).all()
    assert torch.equal(tokens[0], tokens[1])
