"""Training config: conf/ mirrors the presets and dataclass defaults, overrides are typed, errors
are one clear line, validate() catches every bad layout/file before any collective."""

from __future__ import annotations

import copy
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore

from megallama.config import PRESETS, ConfigError, ModelConfig, preset
from megallama.config.compose import (
    CONF_DIR_ENV,
    config_from_yaml,
    default_config_dir,
    load_config,
    load_saved_config,
    save_config,
    to_yaml,
)
from megallama.config.train_config import (
    DataConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
    TrainerConfig,
)
from megallama.config.validate import check_optim, check_parallel, resolve_optimizer
from megallama.data.indexed import IndexedWriter
from megallama.data.tokenizer_trainer import train_tokenizer
from megallama.parallel.topology import Grid
from megallama.training.preflight import validate

CONF = Path(__file__).resolve().parents[1] / "conf"


# ---- composition ---------------------------------------------------------------------------------
def test_default_config_dir_is_repo_conf():
    assert default_config_dir().resolve() == CONF


def test_model_group_is_the_presets_without_a_yaml_copy():
    assert not list((CONF / "model").glob("*.yaml"))  # presets live in megallama.config only
    assert {n.removesuffix(".yaml") for n in ConfigStore.instance().repo["model"]} == set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_option_equals_preset(name):
    cfg = load_config([f"model={name}"])
    assert isinstance(cfg.model, ModelConfig)
    assert cfg.model == preset(name)


def test_defaults_mirror_the_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, TrainConfig)
    assert cfg.model == preset("tiny")
    assert cfg.parallel == ParallelConfig()
    assert cfg.optim == OptimConfig()
    assert cfg.data == DataConfig()
    assert cfg.trainer == TrainerConfig()


def test_llama2_recipe_in_adamw_yaml():
    o = load_config().optim
    assert (o.lr, o.warmup_steps, o.min_lr_ratio, o.weight_decay) == (3e-4, 2000, 0.1, 0.1)
    assert (o.beta1, o.beta2, o.eps, o.grad_clip) == (0.9, 0.95, 1e-5, 1.0)


def test_overrides_reach_the_dataclasses():
    cfg = load_config(["parallel.tp=2", "optim.lr=1e-3", "model=llama2_70b", "model.n_layers=2",
                       "data.train=[a,b]", "data.train_weights=[1,3]", "trainer.precision=bf16"])
    assert cfg.parallel.tp == 2 and cfg.optim.lr == 1e-3
    assert cfg.model == preset("llama2_70b", n_layers=2)
    assert cfg.data.train == ["a", "b"] and cfg.data.train_weights == [1.0, 3.0]
    assert cfg.trainer.precision == "bf16"
    assert isinstance(cfg.parallel, ParallelConfig) and isinstance(cfg.data.train, list)


def test_experiment_tiny_cpu():
    cfg = load_config(["experiment=tiny_cpu"])
    m, p, t = cfg.model, cfg.parallel, cfg.trainer
    assert (m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.vocab_size) == (128, 4, 8, 2, 8000)
    assert (p.tp, p.pp, p.micro_batch_size, p.global_batch_size) == (2, 2, 4, 16)
    assert (t.steps, t.eval_interval, t.eval_iters, t.log_interval) == (300, 50, 4, 10)
    assert (t.device, t.precision, t.output_dir) == ("cpu", "fp32", "runs/demo/train")
    assert (cfg.optim.lr, cfg.optim.warmup_steps) == (1e-3, 30)
    assert cfg.data.train == ["runs/demo/data/sotu_train"]
    assert cfg.data.valid == ["runs/demo/data/sotu_val"]
    assert cfg.data.tokenizer == "runs/demo/data/tokenizer.model"
    assert check_parallel(p, m, cfg.data.seq_len, 4) == Grid(tp=2, pp=2, dp=1)
    # command-line overrides win over the experiment
    assert load_config(["experiment=tiny_cpu", "trainer.steps=20"]).trainer.steps == 20


@pytest.mark.parametrize("precision,impl,zero,world,want", [
    ("bf16", "auto", None, 8, ("distributed", 0)),  # dp 8 (tp = pp = 1)
    ("bf16", "auto", None, 1, ("fused", 0)),  # dp 1: nothing to shard; the path a GPU measured
    ("bf16", "auto", None, None, ("fused", 0)),  # no world size, no process group: dp 1
    ("fp32", "auto", None, 8, ("deepspeed", 1)),
    ("bf16", "auto", 1, 8, ("deepspeed", 1)),  # an explicit ZeRO stage keeps DeepSpeed's optimizer
    ("bf16", "auto", 2, 8, ("deepspeed", 2)),
    ("fp32", "auto", 0, 8, ("distributed", 0)),
    ("fp32", "auto", 0, 1, ("fused", 0)),
    ("bf16", "fused", None, 8, ("fused", 0)),
    ("bf16", "deepspeed", None, 8, ("deepspeed", 1)),
    ("fp32", "distributed", 0, 1, ("distributed", 0)),
])
def test_optimizer_defaults_resolve(precision, impl, zero, world, want):
    cfg = TrainConfig()
    cfg.trainer.precision, cfg.optim.impl, cfg.parallel.zero_stage = precision, impl, zero
    resolve_optimizer(cfg, world)
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == want
    resolve_optimizer(cfg)  # idempotent
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == want


def test_experiment_llama2_7b_sft_is_the_papers_recipe():
    """Llama 2 paper, section 3.1: lr 2e-5 cosine, weight decay 0.1, 64 x 4096 tokens, 2 epochs;
    answers-only loss on dialogs packed whole, from converted weights with a fresh optimizer."""
    cfg = load_config(["experiment=llama2_7b_sft"])
    assert cfg.model == preset("llama2_7b")
    assert (cfg.optim.lr, cfg.optim.min_lr_ratio, cfg.optim.weight_decay) == (2e-5, 0.0, 0.1)
    assert (cfg.parallel.global_batch_size, cfg.data.seq_len, cfg.trainer.epochs) == (64, 4096, 2)
    assert (cfg.data.packing, cfg.data.loss_mask, cfg.trainer.precision) == ("documents", True, "bf16")
    assert cfg.trainer.init_from and cfg.trainer.resume == "auto"
    resolve_optimizer(cfg, 8)  # tp 1 x pp 1 on 8 GPUs is dp 8: the distributed optimizer
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == ("distributed", 0)
    check_optim(cfg.optim)
    assert check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, 8).world_size == 8
    demo = load_config(["experiment=tiny_sft_cpu"])
    assert demo.model == load_config(["experiment=tiny_cpu"]).model  # the demo model, fine-tuned
    assert (demo.data.packing, demo.parallel.tp, demo.parallel.pp) == ("documents", 2, 2)


def test_experiment_llama2_7b_pretrain():
    cfg = load_config(["experiment=llama2_7b_pretrain"])
    assert cfg.model == preset("llama2_7b")
    assert cfg.parallel.global_batch_size * cfg.data.seq_len == 1024 * 4096  # 4M tokens per step
    assert (cfg.trainer.precision, cfg.trainer.steps) == ("bf16", 500000)
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == ("auto", None)
    resolve_optimizer(cfg, 64)  # bf16 at dp 8: the distributed optimizer, ZeRO off
    assert (cfg.optim.impl, cfg.parallel.zero_stage) == ("distributed", 0)
    # the planner's first choice (tests/test_plan.py): nothing recomputed, no TP
    assert (cfg.parallel.activation_checkpointing, cfg.parallel.tp, cfg.parallel.pp) == ("none", 1, 1)
    check_optim(cfg.optim)
    for world in (8, 64):
        grid = check_parallel(cfg.parallel, cfg.model, cfg.data.seq_len, world)
        assert grid.world_size == world


@pytest.mark.parametrize("overrides,message", [
    (["model=llama3"], "unknown model preset 'llama3'; choose one of ['llama2_13b', "),
    (["optim=sgd"], "unknown optim option 'sgd'; choose one of ['adamw']"),
    (["experiment=nope"], "unknown experiment option 'nope'; choose one of"),
    (["model.foo=1"], "unknown config key 'model.foo' (ModelConfig fields: dim,"),
    (["+model.foo=1"], "unknown config key 'model.foo'"),
    (["+foo=1"], "unknown config key 'foo' (TrainConfig fields"),
    (["parallel.tp=abc"], "bad value for parallel.tp: Value 'abc' of type 'str' could not be"),
    (["trainer.seed=1.5"], "bad value for trainer.seed"),
    (["data.train=abc"], "bad value for data.train"),
    (["model.dim=???"], "no value given for model.dim"),
    (["model.n_heads=7"], "model: dim=128 is not divisible by n_heads=7"),
    (["parallel.tp=="], "Error parsing override 'parallel.tp=='"),
])
def test_config_errors_are_one_clear_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(overrides)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_conf_dir_from_env_and_argument(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    trainer = conf / "trainer" / "default.yaml"
    trainer.write_text(trainer.read_text().replace("steps: 100", "steps: 7"))
    assert load_config(config_dir=conf).trainer.steps == 7
    monkeypatch.setenv(CONF_DIR_ENV, str(conf))
    assert load_config().trainer.steps == 7
    with pytest.raises(ConfigError, match="has no config.yaml"):
        load_config(config_dir=tmp_path / "nowhere")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(["experiment=tiny_cpu", "model.rope_theta=5e5", "data.train_weights=[1]"])
    path = save_config(cfg, tmp_path / "run" / "config.yaml")
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temp file left
    assert load_saved_config(path) == cfg
    assert config_from_yaml(to_yaml(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'trainer.stepz'"):
        config_from_yaml(to_yaml(cfg).replace("steps: 300", "stepz: 300"))
    with pytest.raises(ConfigError, match="saved config not found"):
        load_saved_config(tmp_path / "missing.yaml")


def test_rope_scaling_from_yaml(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "experiment" / "long.yaml").write_text(
        "# @package _global_\nmodel:\n  rope_scaling:\n    type: linear\n    factor: 2.0\n")
    cfg = load_config(["experiment=long", "model.rope_scaling.factor=4.0"], config_dir=conf)
    assert cfg.model.rope_scaling.type == "linear" and cfg.model.rope_scaling.factor == 4.0
    assert load_saved_config(save_config(cfg, tmp_path / "c.yaml")) == cfg
    with pytest.raises(ConfigError, match="node that is null"):  # Hydra cannot do this one
        load_config(["model.rope_scaling.factor=2"])


# ---- validate --------------------------------------------------------------------------------
VOCAB = 320


def _write_tokens(prefix: Path, n_tokens: int, vocab: int = VOCAB) -> str:
    rng = random.Random(0)
    with IndexedWriter(prefix, vocab) as w:
        for start in range(0, n_tokens, 100):
            w.add_document([rng.randrange(vocab) for _ in range(min(100, n_tokens - start))])
    return str(prefix)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("data")
    words = "the of and to in a is that for it as was with be by on not he this are or his".split()
    rng = random.Random(0)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "."
                                for _ in range(1000)))
    out = {
        "train": _write_tokens(root / "train", 3000),
        "valid": _write_tokens(root / "valid", 500),
        "short": _write_tokens(root / "short", 20),
        "trunc": _write_tokens(root / "trunc", 500),
        "vocab300": _write_tokens(root / "vocab300", 500, vocab=300),
        "tokenizer": str(train_tokenizer([corpus], root / "tok", VOCAB, num_threads=1)),
        "other_tokenizer": str(train_tokenizer([corpus], root / "tok300", 300, num_threads=1)),
        "root": str(root),
    }
    bin_path = root / "trunc.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-10])
    return out


@pytest.fixture
def good(files) -> TrainConfig:
    return TrainConfig(
        model=preset("tiny_gqa", vocab_size=VOCAB),
        parallel=ParallelConfig(tp=2, pp=2, micro_batch_size=2, global_batch_size=8),
        optim=OptimConfig(lr=1e-3, warmup_steps=10),
        data=DataConfig(train=[files["train"]], valid=[files["valid"]],
                        tokenizer=files["tokenizer"], seq_len=64),
        trainer=TrainerConfig(steps=50, device="cpu"),
    )


def test_validate_accepts_a_good_config(good):
    assert validate(good, 8) == Grid(tp=2, pp=2, dp=2)
    single = copy.deepcopy(good)
    single.parallel = ParallelConfig(tp=1, pp=1, sequence_parallel=True, global_batch_size=4)
    single.data.valid, single.data.valid_fraction = [], 0.05
    assert validate(single, 1) == Grid()


def test_tiny_cpu_experiment_validates_with_real_files(files):
    cfg = load_config(["experiment=tiny_cpu", f"model.vocab_size={VOCAB}",
                       f"data.train=[{files['train']}]", f"data.valid=[{files['valid']}]",
                       f"data.tokenizer={files['tokenizer']}"])
    assert validate(cfg, 4) == Grid(tp=2, pp=2, dp=1)


BAD = [  # (changes, world size, expected fragment of the one-line message)
    ({}, 6, "world size 6 is not divisible by tp*pp = 2*2"),
    ({"parallel.dp": 4}, 8, "world size 8 != tp*pp*dp = 2*2*4"),
    ({"parallel.global_batch_size": 6}, 8, "parallel.global_batch_size=6 is not a multiple of "
                                           "micro_batch_size*dp = 2*2 = 4; set it to e.g. 4"),
    ({"parallel.micro_batch_size": 0}, 8, "parallel.micro_batch_size=0"),
    ({"data.packing": "sft"}, 8, "data.packing='sft': choose one of ['concat', 'documents', "
                                 "'padded']"),
    ({"trainer.epochs": float("nan")}, 8, "trainer.epochs=nan: must be >= 0"),
    ({"parallel.pp": 8}, 16, "parallel.pp=8 > model.n_layers=4"),
    ({"parallel.tp": 3}, 12, "parallel.tp=3 does not divide n_heads=8"),
    ({"parallel.tp": 0}, 8, "parallel.tp=0: must be >= 1"),
    ({"parallel.sequence_parallel": True, "data.seq_len": 63}, 8, "parallel.sequence_parallel"),
    ({"parallel.zero_stage": 4}, 8, "parallel.zero_stage=4"),
    ({"parallel.zero_stage": 2}, 8, "DeepSpeed refuses ZeRO-2/3 with pipeline parallelism"),
    ({"parallel.zero_stage": 0, "optim.impl": "deepspeed"}, 8,
     "parallel.zero_stage=0 with optim.impl=deepspeed"),
    ({"optim.impl": "fused", "parallel.zero_stage": 1}, 8,
     "optim.impl=fused with parallel.zero_stage=1"),
    ({"optim.impl": "apex"}, 8, "optim.impl='apex': choose one of"),
    ({"parallel.partition_method": "even"}, 8, "parallel.partition_method='even'"),
    ({"trainer.precision": "fp16"}, 8, "trainer.precision='fp16': choose one of"),
    ({"trainer.device": "tpu"}, 8, "trainer.device='tpu': choose one of"),
    ({"trainer.device": "cuda"}, 8, "trainer.device=cuda but no CUDA GPU is visible"),
    ({"trainer.nonfinite": "ignore"}, 8, "trainer.nonfinite='ignore'"),
    ({"trainer.steps": 0}, 8, "trainer.steps=0"),
    ({"trainer.log_interval": 0}, 8, "trainer.log_interval=0"),
    ({"trainer.eval_iters": 0}, 8, "trainer.eval_iters=0"),
    ({"data.seq_len": 512}, 8, "data.seq_len=512 > model.max_seq_len=256"),
    ({"data.train": []}, 8, "data.train is empty"),
    ({"data.valid": [], "data.valid_fraction": 0.0}, 8, "there is no validation data"),
    ({"data.valid_fraction": 1.0}, 8, "data.valid_fraction=1.0"),
    ({"data.train": ["{root}/nope"]}, 8, "data.train[0]={root}/nope: token index not found"),
    ({"data.train": ["{trunc}"]}, 8, "is truncated"),
    ({"data.valid": ["{root}/nope"]}, 8, "data.valid[0]={root}/nope"),
    ({"data.train": ["{short}"]}, 8, "fewer than one sample of data.seq_len+1 = 65"),
    ({"data.train_weights": [1.0, 2.0]}, 8, "data.train_weights has 2 entries but data.train has"),
    ({"data.train_weights": [-1.0]}, 8, "data.train_weights=[-1.0]"),
    ({"data.tokenizer": "{root}/missing.model"}, 8, "data.tokenizer: tokenizer model not found"),
    ({"data.tokenizer": "{other_tokenizer}"}, 8,
     f"data.tokenizer: model vocab_size {VOCAB} != tokenizer vocab_size 300"),
    ({"model.vocab_size": 300, "data.tokenizer": None}, 8,
     f"tokenized with a {VOCAB}-piece vocabulary but model.vocab_size=300"),
    ({"optim.warmup_steps": -1}, 8, "optim.warmup_steps=-1"),
    ({"optim.min_lr_ratio": 1.5}, 8, "optim.min_lr_ratio=1.5"),
    ({"optim.decay_steps": 10}, 8, "optim.decay_steps=10 <= warmup_steps=10"),
    ({"optim.beta2": 1.0}, 8, "optim.beta2=1.0"),
    ({"optim.eps": 0.0}, 8, "optim.eps=0.0"),
    ({"optim.impl": "distributed", "optim.bucket_mb": float("inf")}, 8,
     "optim.bucket_mb=inf: must be in (0, 1048576] (MiB of gradients per reduce-scatter bucket"),
    ({"optim.impl": "distributed", "optim.bucket_mb": float("nan")}, 8,
     "optim.bucket_mb=nan: must be in (0, 1048576]"),
    ({"optim.impl": "distributed", "optim.bucket_mb": 1e308}, 8, "optim.bucket_mb=1e+308: must be"),
    ({"optim.impl": "distributed", "optim.bucket_mb": 0.0}, 8, "optim.bucket_mb=0.0: must be"),
    ({"trainer.init_from": "{root}/base", "trainer.resume": "{root}/run"}, 8,
     "trainer.init_from={root}/base with trainer.resume={root}/run: the resumed checkpoint brings "
     "its own weights, so init_from would be ignored; give only one of them"),
    # sizes and counts below their range, the run directory, more file classes
    ({"parallel.global_batch_size": 0}, 8, "parallel.global_batch_size=0: must be >= 1"),
    ({"parallel.dp": 0}, 8, "parallel.dp=0: must be >= 1"),
    ({"trainer.steps": -5}, 8, "trainer.steps=-5: must be >= 1"),
    ({"trainer.save_interval": -1}, 8, "trainer.save_interval=-1: must be >= 0"),
    ({"trainer.eval_interval": -1}, 8, "trainer.eval_interval=-1: must be >= 0"),
    ({"trainer.keep_last": -1}, 8, "trainer.keep_last=-1: must be >= 0 (0 keeps every"),
    ({"trainer.seed": -1}, 8, "trainer.seed=-1: must be in [0, 2**63)"),
    ({"data.seq_len": 0}, 8, "data.seq_len=0: must be >= 1"),
    ({"optim.lr": -1e-3}, 8, "optim.lr=-0.001: the peak learning rate must be >= 0"),
    ({"optim.lr": float("nan")}, 8, "optim.lr=nan"),
    ({"optim.weight_decay": -0.1}, 8, "optim.weight_decay=-0.1: must be >= 0"),
    ({"optim.grad_clip": -1.0}, 8, "optim.grad_clip=-1.0: must be >= 0"),
    ({"trainer.output_dir": ""}, 8, "trainer.output_dir is empty"),
    ({"trainer.output_dir": "{root}/corpus.txt"}, 8,
     "trainer.output_dir={root}/corpus.txt is a file, not a directory"),
    ({"trainer.output_dir": "{root}/corpus.txt/run"}, 8,
     "trainer.output_dir={root}/corpus.txt/run is under the file {root}/corpus.txt"),
    ({"data.train": ["{root}/corpus.txt"]}, 8, "token index not found: {root}/corpus.txt.idx"),
    ({"data.valid": ["{vocab300}"]}, 8, "data.valid[0]={vocab300} was tokenized with a 300-piece "
                                        "vocabulary but data.train[0]={train} with a 320-piece"),
    ({"data.tokenizer": "{root}"}, 8, "data.tokenizer: tokenizer model is not a file"),
    ({"data.tokenizer": "{root}/corpus.txt"}, 8, "is not a valid SentencePiece model"),
    ({"data.train": ["{valid}"], "data.valid": [], "data.valid_fraction": 0.9}, 8,
     "data.train[0]={valid} holds 500 tokens: too few to hold out data.valid_fraction=0.9"),
]


@pytest.mark.parametrize("changes,world,message", BAD, ids=[m[:40] for _, _, m in BAD])
def test_validate_rejects(good, files, monkeypatch, changes, world, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = copy.deepcopy(good)
    for dotted, value in changes.items():
        section, field = dotted.split(".")
        if isinstance(value, str):
            value = value.format(**files)
        elif isinstance(value, list):
            value = [v.format(**files) if isinstance(v, str) else v for v in value]
        setattr(getattr(cfg, section), field, value)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world)
    text = str(info.value)
    assert re.search(re.escape(message.format(**files)), text), text
    assert "\n" not in text


# Several problems at once: the primary one is reported, not a consequence of it.
ORDER = [
    ({"data.train": [], "data.valid": [], "parallel.global_batch_size": 7, "trainer.steps": 0},
     8, "data.train is empty"),
    ({"data.seq_len": -3, "parallel.sequence_parallel": True}, 8, "data.seq_len=-3: must be >= 1"),
    ({"data.train": ["{root}/nope"], "data.tokenizer": "{root}/missing.model"}, 8,
     "data.train[0]={root}/nope: token index not found"),
    ({"data.valid": ["{vocab300}"], "model.vocab_size": 300}, 8,
     "data.valid[0]={vocab300} was tokenized with a 300-piece vocabulary but data.train[0]"),
    ({"data.tokenizer": "{other_tokenizer}", "model.vocab_size": 300}, 8,
     "data.tokenizer={other_tokenizer} has 300 pieces but data.train[0]={train} was tokenized "
     "with a 320-piece vocabulary: point data.tokenizer at the tokenizer megallama-preprocess"),
    ({"data.train": ["{short}"], "data.valid": ["{vocab300}"]}, 8, "all token files must come"),
]


@pytest.mark.parametrize("changes,world,message", ORDER, ids=[m[:40] for _, _, m in ORDER])
def test_validate_reports_the_primary_problem_first(good, files, monkeypatch, changes, world,
                                                    message):
    test_validate_rejects(good, files, monkeypatch, changes, world, message)


def test_init_from_with_resume_auto_is_legal(good, monkeypatch):
    """A fine-tuning run restarted with trainer.resume=auto resumes its own checkpoint: legal."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = copy.deepcopy(good)
    cfg.trainer.init_from, cfg.trainer.resume = "base/checkpoint", "auto"
    assert validate(cfg, 8) == Grid(tp=2, pp=2, dp=2)
    cfg.trainer.resume = "none"
    assert validate(cfg, 8) == Grid(tp=2, pp=2, dp=2)
