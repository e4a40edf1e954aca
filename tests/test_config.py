"""Model config: Meta's FFN rule, presets, params.json and HF config.json round trips, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest

from megallama.config import ConfigError, ModelConfig, preset


@pytest.mark.parametrize("name,ffn,params_b", [
    ("llama2_7b", 11008, 6.74), ("llama2_13b", 13824, 13.02), ("llama2_70b", 28672, 68.98),
])
def test_presets_match_meta(name, ffn, params_b):
    cfg = preset(name)
    assert cfg.ffn_hidden_dim == ffn
    assert cfg.norm_eps == 1e-5 and cfg.max_seq_len == 4096 and cfg.rope_theta == 10000.0
    assert abs(cfg.num_parameters() / 1e9 - params_b) < 0.01


def test_70b_has_eight_kv_heads():
    assert preset("llama2_70b").n_kv_heads == 8 and preset("llama2_7b").n_kv_heads == 32


def test_meta_params_round_trip(tmp_path):
    # Meta's published 70B params.json, vocab_size -1 (set from the tokenizer)
    meta = {"dim": 8192, "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "n_heads": 64,
            "n_kv_heads": 8, "n_layers": 80, "norm_eps": 1e-05, "vocab_size": -1}
    (tmp_path / "params.json").write_text(json.dumps(meta))
    cfg = ModelConfig.from_meta_params_file(tmp_path / "params.json", vocab_size=32000)
    assert cfg == preset("llama2_70b")
    assert {**meta, "vocab_size": 32000} == cfg.to_meta_params()


@pytest.mark.parametrize("name,scaled", [("llama3_8b", False), ("llama3_1_8b", True)])
def test_llama3_meta_params_round_trip(name, scaled):
    """Meta's published Llama 3 / 3.1 8B params.json (3.1 adds use_scaled_rope: Meta's
    apply_scaling, factor 8) is the preset: 8k context for 3.0, 128k for 3.1; written back as is."""
    meta = {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
            "ffn_dim_multiplier": 1.3, "multiple_of": 1024, "norm_eps": 1e-05,
            "rope_theta": 500000.0, **({"use_scaled_rope": True} if scaled else {})}
    cfg = ModelConfig.from_meta_params(meta)
    assert cfg == preset(name)
    assert cfg.max_seq_len == (131072 if scaled else 8192)
    assert cfg.to_meta_params() == meta


def test_meta_params_errors(tmp_path):
    with pytest.raises(ConfigError, match="params.json not found"):
        ModelConfig.from_meta_params_file(tmp_path / "params.json")
    (tmp_path / "params.json").write_text(json.dumps({"dim": 64, "n_heads": 4, "n_layers": 1,
                                                      "vocab_size": -1}))
    with pytest.raises(ConfigError, match="vocab_size=-1"):
        ModelConfig.from_meta_params_file(tmp_path / "params.json")


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_13b", "llama2_70b", "tiny_gqa", "tiny_70b_shape"])
def test_hf_config_round_trip(name):
    cfg = preset(name, rope_scaling={"type": "dynamic", "factor": 2.0})
    back = ModelConfig.from_hf_config(cfg.to_hf_config())
    assert back.ffn_hidden_dim == cfg.ffn_hidden_dim
    assert back.to_hf_config() == cfg.to_hf_config()
    assert cfg.to_hf_config()["rms_norm_eps"] == 1e-5


def _hf_fields(hf) -> dict:
    """The fields of a transformers LlamaConfig that fix the weights and the forward; RoPE's
    theta and scaling are read where the installed transformers keeps them (``rope_theta`` and
    ``rope_scaling`` before 5.0, ``rope_parameters`` since)."""
    rope = {**(getattr(hf, "rope_scaling", None) or {}), **(getattr(hf, "rope_parameters", None) or {})}
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
             "tie_word_embeddings")
    return {**{k: getattr(hf, k) for k in names},
            "rope_theta": rope.get("rope_theta", getattr(hf, "rope_theta", None)),
            "rope_type": rope.get("rope_type", rope.get("type", "default")),
            "rope_factor": rope.get("factor"),
            "rope_llama3": [rope.get(k) for k in ("low_freq_factor", "high_freq_factor",
                                                  "original_max_position_embeddings")]}


_LLAMA2 = dict(vocab_size=32000, rms_norm_eps=1e-5, max_position_embeddings=4096,
               rope_theta=10000.0, rope_type="default", rope_factor=None, tie_word_embeddings=False,
               rope_llama3=[None, None, None])
_LLAMA3_1 = dict(vocab_size=128256, rms_norm_eps=1e-5, max_position_embeddings=131072,
                 rope_theta=500000.0, rope_type="llama3", rope_factor=8.0,
                 tie_word_embeddings=False, rope_llama3=[1.0, 4.0, 8192], num_key_value_heads=8)


# Expected values: Llama 2's and 3's config.json on the Hub (meta-llama/Llama-2-{7b,13b,70b}-hf,
# meta-llama/Llama-3.1-{8B,70B}, meta-llama/Llama-3.2-1B), and for
# the tiny model Meta's FFN rule by hand (int(2/3 * 4 * 128) = 341, up to a multiple of 32: 352).
@pytest.mark.parametrize("name,over,want", [
    ("llama2_7b", {}, dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, num_key_value_heads=32, head_dim=128)),
    ("llama2_13b", {}, dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                            num_attention_heads=40, num_key_value_heads=40, head_dim=128)),
    ("llama2_70b", {}, dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                            num_attention_heads=64, num_key_value_heads=8, head_dim=128)),
    ("tiny_gqa", {"vocab_size": 1000, "rope_theta": 500000.0, "norm_eps": 1e-6,
                  "rope_scaling": {"type": "linear", "factor": 4.0}},
     dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=8,
          num_key_value_heads=2, head_dim=16, vocab_size=1000, rms_norm_eps=1e-6,
          max_position_embeddings=256, rope_theta=500000.0, rope_type="linear", rope_factor=4.0,
          tie_word_embeddings=False, rope_llama3=[None, None, None])),
    ("llama3_1_8b", {}, dict(_LLAMA3_1, hidden_size=4096, intermediate_size=14336,
                             num_hidden_layers=32, num_attention_heads=32, head_dim=128)),
    ("llama3_1_70b", {}, dict(_LLAMA3_1, hidden_size=8192, intermediate_size=28672,
                              num_hidden_layers=80, num_attention_heads=64, head_dim=128)),
    ("llama3_2_1b", {}, dict(_LLAMA3_1, hidden_size=2048, intermediate_size=8192,
                             num_hidden_layers=16, num_attention_heads=32, head_dim=64,
                             rope_factor=32.0, tie_word_embeddings=True)),
], ids=["7b", "13b", "70b", "tiny_gqa-theta-eps-linear", "3.1-8b", "3.1-70b", "3.2-1b"])
def test_hf_config_loads_in_transformers(name, over, want, tmp_path):
    """transformers is the oracle: the config.json we write, loaded by transformers.LlamaConfig,
    has the published sizes, heads, KV heads, eps, RoPE theta/scaling and vocabulary; and a
    config.json transformers itself writes from it reads back as the same model config."""
    transformers = pytest.importorskip("transformers")
    cfg = preset(name, **over)
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "config.json").write_text(json.dumps(cfg.to_hf_config()))
    hf = transformers.LlamaConfig.from_pretrained(tmp_path / "ours")
    assert _hf_fields(hf) == want
    hf.save_pretrained(tmp_path / "theirs")
    back = ModelConfig.from_hf_config(json.loads((tmp_path / "theirs" / "config.json").read_text()))
    assert _hf_fields(transformers.LlamaConfig(**back.to_hf_config())) == want
    assert back.to_hf_config() == cfg.to_hf_config()


def test_bad_configs():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(dim=64, n_heads=4, n_kv_heads=3, vocab_size=10)
    with pytest.raises(ConfigError, match="unknown model preset"):
        preset("llama5_8b")
    with pytest.raises(ConfigError, match="rope_scaling.type"):
        preset("tiny", rope_scaling={"type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("field,value,message", [
    ("n_heads", 0, "n_heads=0: must be >= 1"),
    ("n_layers", -2, "n_layers=-2: must be >= 1"),
    ("dim", "4096", "dim='4096': expected an integer"),
    ("n_heads", True, "n_heads=True: expected an integer"),
    ("norm_eps", "1e-5", "norm_eps='1e-5': expected a number"),
    ("norm_eps", 0.0, "norm_eps=0.0: must be a finite number > 0"),
    ("rope_theta", float("inf"), "rope_theta=inf: must be a finite number > 0"),
    ("ffn_dim_multiplier", -1.3, "ffn_dim_multiplier=-1.3"),
    ("max_seq_len", 0, "max_seq_len=0"),
    ("pad_token_id", "0", "pad_token_id='0': expected an integer or null"),
    ("vocab_size", 0, "vocab_size=0: must be >= 1"),
    ("vocab_size", -1, "set it from the tokenizer"),
])
def test_fields_are_type_and_range_checked(field, value, message):
    """params.json / config.json values of the wrong kind are refused where the config is built,
    with one line naming the field (a string norm_eps was once copied into an export)."""
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_meta_params({**preset("tiny").to_meta_params(), field: value})
    assert message in str(info.value) and "\n" not in str(info.value)


def test_tied_embeddings_pass_at_any_pipeline_depth():
    """Llama 3.2's tied head at pp > 1 (the last stage holds a copy of the embedding, summed with
    it by the engine): a Hydra ``model=llama3_2_1b`` run with pp = 2 passes option validation and
    the layout cuts it like an untied model; the planner proposes pp > 1 too."""
    from megallama.config.compose import load_config
    from megallama.config.validate import check_parallel, resolve_optimizer
    from megallama.model.layout import stage_cuts

    cfg = load_config(overrides=["model=llama3_2_1b", "parallel.pp=2"])
    assert cfg.model == preset("llama3_2_1b") and cfg.model.tie_embeddings
    resolve_optimizer(cfg, 2)
    check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, world_size=2)
    untied = dataclasses.replace(cfg.model, tie_embeddings=False)
    assert stage_cuts(cfg.model, 2, 2048) == stage_cuts(untied, 2, 2048)
    from megallama.training import planner

    layouts = planner.candidate_layouts(cfg.model, 8, global_batch=64)
    assert {lay.pp for lay in layouts} > {1}
    # the model counts the one table once (1.24B parameters)
    kinds = planner.layer_params(cfg.model, 1)
    total = kinds["tok_embeddings"] + 16 * kinds["block"] + kinds["norm"] + kinds["output"]
    assert kinds["output"] == 0 and total == cfg.model.num_parameters() == 1_235_814_400


@pytest.mark.parametrize("bad,message", [
    ({"factor": "8"}, "rope_scaling.factor='8': expected a finite number"),
    ({"low_freq_factor": float("nan")}, "rope_scaling.low_freq_factor=nan"),
    ({"original_max_position_embeddings": None}, "rope_scaling.original_max_seq_len=None"),
    ({"high_freq_factor": 0.5}, "low_freq_factor=1.0, high_freq_factor=0.5: need 0 < low < high"),
])
def test_llama3_rope_scaling_values_are_checked(bad, message):
    """config.json's llama3 rope_scaling values of the wrong kind are one line naming the field."""
    hf = preset("llama3_1_8b").to_hf_config()
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_hf_config({**hf, "rope_scaling": {**hf["rope_scaling"], **bad}})
    assert message in str(info.value) and "\n" not in str(info.value)
