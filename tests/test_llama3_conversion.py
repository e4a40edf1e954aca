"""megallama-reshard on Llama 3 checkpoints: Meta's consolidated shards (params.json with
``use_scaled_rope``, rope_theta 500000, vocabulary 128,256, no ``rope.freqs``), HF (config.json
with ``rope_scaling`` llama3 and ``tie_word_embeddings``) and megallama at any (tp, pp), round trips
bit-exact, transformers loading every HF export with our logits.

Meta inputs are written here with ``torch.save`` and a params.json spelled out as Meta ships it;
HF inputs with transformers' ``save_pretrained``: the readers meet independent writers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megallama.checkpoint.atomic import CheckpointError
from megallama.checkpoint.weights import read_index
from megallama.config import ModelConfig, preset
from megallama.data.tokenizer import Tokenizer
from megallama.interop.convert import convert
from megallama.interop.meta import ROPE_FREQS
from megallama.interop.names import meta_split_dim
from megallama.model.layout import shard_specs
from tests.conftest import require_llama3_tokenizer
from tests.test_reshard import (
    assert_same,
    assert_transformers_agrees,
    hf_tensors,
    load_meta,
    random_state,
)

# Llama 3.1's params.json fields (8B: dim 4096, 32 layers, 32 heads) at tiny width
META_PARAMS = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256,
               "multiple_of": 64, "norm_eps": 1e-05, "rope_theta": 500000.0,
               "use_scaled_rope": True}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_llama3_meta(path: Path, params: dict, state: dict[str, torch.Tensor], k: int) -> Path:
    """Consolidated shards as Meta ships Llama 3: fairscale slices and no rope.freqs."""
    path.mkdir(parents=True)
    for i in range(k):
        sd = {name: t.clone() if (dim := meta_split_dim(name)) is None else
              t.chunk(k, dim)[i].clone() for name, t in state.items()}
        torch.save(sd, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(params))
    return path


def test_meta_llama3_to_megallama_hf_and_back_bit_exact(tmp_path):
    """Meta (2 shards) -> megallama (tp 4 > 2 KV heads, pp 2) -> HF -> megallama (tp 2) -> Meta:
    the shards come back bit for bit, params.json as given; the HF export declares llama3 RoPE
    scaling, 128k positions and Llama 3's BOS/EOS, and transformers computes our logits."""
    cfg = ModelConfig.from_meta_params(META_PARAMS)
    assert cfg.rope_scaling is not None and cfg.rope_scaling.type == "llama3"
    assert (cfg.rope_scaling.factor, cfg.max_seq_len) == (8.0, 131072)
    state = random_state(cfg, seed=1)
    src = write_llama3_meta(tmp_path / "meta", META_PARAMS, state, k=2)
    convert(f"meta:{src}", f"megallama:{tmp_path / 'mg'}", tp=4, pp=2, progress=False)
    assert read_index(tmp_path / "mg")["saved_layout"] == {"tp": 4, "pp": 2, "dp": 1}
    convert(f"megallama:{tmp_path / 'mg'}", f"hf:{tmp_path / 'hf'}", progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 8192}
    assert (config["max_position_embeddings"], config["rope_theta"], config["vocab_size"],
            config["tie_word_embeddings"]) == (131072, 500000.0, 128256, False)
    assert (config["bos_token_id"], config["eos_token_id"]) == (128000, 128001)
    assert_transformers_agrees(tmp_path / "hf", cfg, state)
    convert(f"hf:{tmp_path / 'hf'}", f"megallama:{tmp_path / 'mg2'}", tp=2, progress=False)
    convert(f"megallama:{tmp_path / 'mg2'}", f"meta:{tmp_path / 'back'}", mp=2, progress=False)
    back = load_meta(tmp_path / "back")
    assert all(ROPE_FREQS not in sd for sd in back)  # Meta's Llama 3 code loads strictly
    for orig, got in zip(load_meta(src), back, strict=True):
        assert_same(orig, got)
    assert json.loads((tmp_path / "back" / "params.json").read_text()) == META_PARAMS


def test_70b_shaped_llama3_eight_meta_shards(tmp_path):
    """The 8-shard layout of Llama 3 70B (8 KV heads, embedding split along dim, head along
    vocabulary): Meta 8 -> megallama (tp 4, pp 2) -> Meta 8 bit-exact, and the HF export agrees."""
    params = {"dim": 256, "n_layers": 2, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 2048,
              "multiple_of": 64, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05,
              "rope_theta": 500000.0, "use_scaled_rope": True}
    cfg = ModelConfig.from_meta_params(params)
    state = random_state(cfg, seed=5)
    src = write_llama3_meta(tmp_path / "meta", params, state, k=8)
    convert(f"meta:{src}", f"megallama:{tmp_path / 'mg'}", tp=4, pp=2, progress=False)
    convert(f"megallama:{tmp_path / 'mg'}", f"meta:{tmp_path / 'back'}", mp=8, progress=False)
    for orig, got in zip(load_meta(src), load_meta(tmp_path / "back"), strict=True):
        assert_same(orig, got)
    convert(f"megallama:{tmp_path / 'mg'}", f"hf:{tmp_path / 'hf'}", progress=False)
    assert_transformers_agrees(tmp_path / "hf", cfg, state)


def test_tied_llama3_2_round_trips(tmp_path):
    """Llama 3.2's tied embeddings: an HF checkpoint saved by transformers (no lm_head stored,
    rope factor 32) -> megallama (tp 2; one embedding table, no output.weight) -> HF bit-exact ->
    Meta (output.weight written as the embedding, which Meta's code loads) -> megallama (tp 4) ->
    HF bit-exact again; at pp 2 the table is stored once, by the first stage, and round-trips;
    an untied head under a tied config.json is refused rather than dropped."""
    transformers = pytest.importorskip("transformers")
    cfg = preset("tiny_llama3_tied")
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf_config()))
    src = tmp_path / "src"
    model.save_pretrained(src)
    assert "lm_head.weight" not in hf_tensors(src)
    mg = tmp_path / "mg"
    convert(f"hf:{src}", f"megallama:{mg}", tp=2, progress=False)
    assert "output.weight" not in read_index(mg)["tensors"]
    assert [s.name for s in shard_specs(cfg, 2)][-1] == "norm.weight"
    convert(f"megallama:{mg}", f"hf:{tmp_path / 'hf'}", progress=False)
    assert_same(hf_tensors(src), hf_tensors(tmp_path / "hf"))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["tie_word_embeddings"]
    convert(f"megallama:{mg}", f"meta:{tmp_path / 'meta'}", progress=False)
    (sd,) = load_meta(tmp_path / "meta")
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])
    params = json.loads((tmp_path / "meta" / "params.json").read_text())
    assert params["use_scaled_rope"] and params["rope_scaling_factor"] == 32.0
    convert(f"meta:{tmp_path / 'meta'}", f"megallama:{tmp_path / 'mg4'}", tp=4, progress=False)
    convert(f"megallama:{tmp_path / 'mg4'}", f"hf:{tmp_path / 'hf2'}", progress=False)
    assert_same(hf_tensors(src), hf_tensors(tmp_path / "hf2"))
    state = {n: t for n, t in sd.items() if n != "output.weight"}
    assert_transformers_agrees(tmp_path / "hf2", cfg, state)
    # pp 2: the table once, in the first stage's shard (the last stage loads its copy from it)
    convert(f"hf:{src}", f"megallama:{tmp_path / 'pp2'}", tp=2, pp=2, progress=False)
    index = read_index(tmp_path / "pp2")
    assert "output.weight" not in index["tensors"]
    assert {x["file"][:10] for x in index["tensors"]["tok_embeddings.weight"]["pieces"]} \
        == {"model-pp00"}
    convert(f"megallama:{tmp_path / 'pp2'}", f"hf:{tmp_path / 'hf3'}", progress=False)
    assert_same(hf_tensors(src), hf_tensors(tmp_path / "hf3"))
    untied = {**sd, "output.weight": sd["output.weight"] + 1}  # under a tied params.json
    write_llama3_meta(tmp_path / "untied", params, untied, k=1)
    with pytest.raises(CheckpointError, match="output.weight differs from tok_embeddings"):
        convert(f"meta:{tmp_path / 'untied'}", f"hf:{tmp_path / 'x'}", progress=False)
    assert not (tmp_path / "x").exists()


def test_hf_export_ships_llama3_tokenizer_and_stop_ids(tmp_path):
    """An HF export given Llama 3's tiktoken file carries tokenizer.json that AutoTokenizer loads
    with tiktoken's ids, and a generation_config whose EOS list is the tokenizer's stop ids (so
    transformers' generate stops at <|eot_id|> as megallama does)."""
    transformers = pytest.importorskip("transformers")
    path = require_llama3_tokenizer()
    cfg = ModelConfig.from_meta_params(META_PARAMS)
    src = write_llama3_meta(tmp_path / "meta", META_PARAMS, random_state(cfg, seed=2), k=1)
    convert(f"meta:{src}", f"hf:{tmp_path / 'hf'}", tokenizer=path, progress=False)
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (128000, [128001, 128008, 128009])
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Llama 3 says: héllo,  wörld!\n\n12345 🦙"
    assert theirs(text).input_ids == Tokenizer(path).encode(text, bos=True)
