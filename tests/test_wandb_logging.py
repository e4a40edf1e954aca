"""Weights & Biases beside TensorBoard (``trainer.wandb.*``).

Checks: off by default and then wandb is never imported; a missing wandb package with W&B asked for
is one ConfigError line naming ``megallama[wandb]``, from validation on every rank before any
collective; a real torchrun run in offline mode writes one W&B run (rank 0's) whose history equals
the TensorBoard series step by step and whose config is the resolved config, and a resumed run
continues the same W&B run id.

The offline run is read from its ``run-<id>.wandb`` transaction log: W&B's LevelDB-style record log
(a 7-byte ``:W&B`` header, 32 KiB blocks of CRC-checked chunks) of ``wandb_internal_pb2.Record``
messages. wandb >= 0.18 no longer ships a Python reader for it, so :func:`wandb_records` is one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from megallama.config import ConfigError
from megallama.config.compose import load_config
from megallama.config.train_config import WandbConfig
from megallama.config.validate import check_wandb, validate_options
from megallama.training import preflight, tracking
from megallama.training.tracking import RUN_ID_FILE, WandbStartError, open_wandb_run, run_id
from tests.distributed import conftest as distributed_fixtures
from tests.distributed.cli import REPO, overrides, read_scalars, torchrun

token_files = distributed_fixtures.token_files  # the multi-process tests' token files
needs_wandb = pytest.mark.skipif(importlib.util.find_spec("wandb") is None,
                                 reason="needs the wandb extra: pip install 'megallama[wandb]'")


# ---- options and validation --------------------------------------------------------------------
def test_off_by_default_and_mirrored_in_conf():
    assert load_config().trainer.wandb == WandbConfig()
    assert WandbConfig().mode == "disabled"


def test_missing_wandb_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    cfg = load_config([f"data.train=[{tmp_path / 'x'}]", "trainer.eval_interval=0",
                       "trainer.wandb.mode=offline"])
    with pytest.raises(ConfigError) as info:
        validate_options(cfg, world_size=1)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("trainer.wandb.mode=offline needs the wandb package")
    assert "pip install 'megallama[wandb]'" in text
    check_wandb(WandbConfig())  # disabled: no import attempted, no error


@pytest.mark.parametrize("options,message", [
    (dict(mode="on"), "trainer.wandb.mode='on': choose one of ['disabled', 'offline', 'online']"),
    (dict(mode="offline", project=""), "trainer.wandb.project is empty"),
])
def test_bad_options(options, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        check_wandb(WandbConfig(**options))


def test_defaults_never_import_wandb(tmp_path):
    """Validation and the writer of a default run (TensorBoard only) leave wandb unimported."""
    code = f"""
import sys
from megallama.config.compose import load_config
from megallama.config.validate import validate_options
from megallama.training.metrics import MetricsWriter
cfg = load_config(["data.train=[x]", "trainer.eval_interval=0", "trainer.output_dir={tmp_path}"])
validate_options(cfg, 1)
with MetricsWriter.for_run(cfg, enabled=True) as w:
    w.scalars(1, {{"train/loss": 1.0}})
print(sorted(m for m in sys.modules if m.split(".")[0] == "wandb"))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "tensorboard").is_dir() and not (tmp_path / "wandb").exists()
    assert not (tmp_path / RUN_ID_FILE).exists()


def test_run_id_is_kept_for_a_resumed_run_only(tmp_path):
    first = run_id(tmp_path, resumed=False)
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == first
    assert run_id(tmp_path, resumed=True) == first  # continues the W&B run
    fresh = run_id(tmp_path, resumed=False)  # started over from step 0: a new W&B run
    assert fresh != first and (tmp_path / RUN_ID_FILE).read_text().strip() == fresh
    assert run_id(tmp_path / "other", resumed=True) != fresh  # nothing recorded: a new id


# ---- online without credentials, a run that does not open -----------------------------------------
@pytest.fixture
def no_credentials(monkeypatch, tmp_path) -> Path:
    """An environment where wandb finds no credentials: no WANDB_* variables, an empty home
    (netrc, settings files) and working directory."""
    for name in [k for k in os.environ if k.startswith("WANDB_")] + ["NETRC"]:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def _online(tmp_path: Path, *more: str):
    return load_config([f"data.train=[{tmp_path / 'x'}]", "trainer.eval_interval=0",
                        f"trainer.output_dir={tmp_path / 'run'}", "trainer.wandb.mode=online",
                        *more])


@needs_wandb
def test_online_without_an_api_key_stops_in_preflight(no_credentials, monkeypatch, tmp_path):
    """No key in the environment, the netrc file or wandb's settings: one line from preflight
    (before torch.distributed starts) naming trainer.wandb.mode=offline; any one source passes."""
    monkeypatch.setattr(preflight, "check_data_files", lambda *_: None)  # no token files here
    cfg = _online(tmp_path)
    with pytest.raises(ConfigError) as info:
        preflight.validate(cfg, 1)
    text = str(info.value)
    assert "\n" not in text and text.startswith("trainer.wandb.mode=online but no W&B API key")
    assert "set trainer.wandb.mode=offline" in text and "wandb login" in text
    assert not (tmp_path / "run").exists()
    preflight.validate(_online(tmp_path, "trainer.wandb.mode=offline"), 1)  # offline: no key needed

    netrc = no_credentials / ".netrc"
    netrc.write_text("machine example.com login user password other\n")  # another host's
    with pytest.raises(ConfigError, match="no W&B API key"):
        preflight.validate(cfg, 1)
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert tracking.wandb_key_source() == str(netrc)
    preflight.validate(cfg, 1)
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert tracking.wandb_key_source() == "WANDB_API_KEY"
    monkeypatch.delenv("WANDB_API_KEY")
    settings = no_credentials / ".config" / "wandb" / "settings"
    settings.parent.mkdir(parents=True)
    settings.write_text("[default]\nbase_url = https://wandb.example.org\n")
    netrc.write_text("machine wandb.example.org login user password " + "k" * 40 + "\n")
    assert tracking.wandb_key_source() == str(netrc)  # the host the settings name


@needs_wandb
def test_a_run_that_does_not_open_is_one_line_and_leaves_no_run_id(no_credentials, monkeypatch,
                                                                    tmp_path):
    """wandb.init failing (here without the network: it raises as a refused key or an unreachable
    server does) is a WandbStartError line naming trainer.wandb.mode=offline; the new run id is
    not recorded and the wandb/ folder the attempt created is removed. A resumed run keeps its id."""
    import wandb

    cfg, out = _online(tmp_path), tmp_path / "run"
    out.mkdir()

    def failing_init(*, dir, id, **_):  # noqa: A002 - wandb's own argument names
        (Path(dir) / "wandb" / f"run-{id}" / "logs").mkdir(parents=True)
        raise wandb.errors.CommError(f"Failed to get resume status for run {id}: context "
                                     "deadline exceeded\nwhile retrying: connection refused")

    monkeypatch.setattr(wandb, "init", failing_init)
    with pytest.raises(WandbStartError) as info:
        open_wandb_run(cfg, resumed=False)
    text = str(info.value)
    assert "\n" not in text and text.startswith("trainer.wandb.mode=online: W&B could not start "
                                                 "the run (Failed to get resume status for run")
    assert "while retrying: connection refused); check the API key" in text
    assert "set trainer.wandb.mode=offline" in text
    assert sorted(p.name for p in out.iterdir()) == []  # no wandb_run_id, no wandb/

    (out / RUN_ID_FILE).write_text("abcd1234\n")  # a resumed run that fails keeps its W&B id
    with pytest.raises(WandbStartError):
        open_wandb_run(cfg, resumed=True)
    assert (out / RUN_ID_FILE).read_text() == "abcd1234\n"

    class Opened:
        id = "opened"

    monkeypatch.setattr(wandb, "init", lambda **kwargs: Opened())
    assert open_wandb_run(cfg, resumed=False).id == "opened"
    assert (out / RUN_ID_FILE).read_text().strip() != "abcd1234"  # a new id, recorded on success


def test_an_error_found_after_start_up_is_one_line_exit_2(monkeypatch, capsys):
    """megallama.train's main: a ConfigError raised while training starts (the W&B run that does
    not open, on rank 0) ends as the one line and exit status 2, not a traceback."""
    from megallama import train as train_module
    from megallama.training import loop

    monkeypatch.delenv("MEGALLAMA_DEBUG", raising=False)
    monkeypatch.setattr(train_module, "prepare", lambda *_: (None, None, None))
    monkeypatch.setattr(train_module, "init_distributed", lambda *_: None)
    monkeypatch.setattr(train_module.faulthandler, "register", lambda *_, **__: None)  # capsys

    def refused(*_args):
        raise WandbStartError("trainer.wandb.mode=online: W&B could not start the run (x)")

    monkeypatch.setattr(loop, "Trainer", refused)  # W&B opens while the Trainer is built
    assert train_module.main([]) == 2
    err = capsys.readouterr().err
    assert err == "megallama.train: error: trainer.wandb.mode=online: W&B could not start the " \
                  "run (x)\n"


# ---- reading an offline run ----------------------------------------------------------------------
def wandb_records(path: Path) -> Iterator:
    """The ``Record`` messages of a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a W&B transaction log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0:  # zero padding up to the next block
            pos += -pos % block
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"bad chunk in {path}"
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first, or middle/last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def offline_run(path: Path) -> tuple[str, dict[int, dict], dict]:
    """(run id, history rows by step, config) of an offline run's ``.wandb`` file."""
    run, history, config = "", {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run.run_id
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                   for i in record.history.item}
            history[row["_step"]] = row
            continue
        else:
            continue
        config.update({(u.key or "/".join(u.nested_key)): json.loads(u.value_json)
                       for u in updates})
    return run, history, config


def series(history: dict[int, dict], key: str) -> tuple[list[int], list[float]]:
    steps = sorted(s for s, row in history.items() if key in row)
    return steps, [history[s][key] for s in steps]


# ---- a real run ----------------------------------------------------------------------------------
def _wandb_env(tmp_path: Path) -> dict[str, str]:
    """W&B's own files under tmp_path, no network, no settings of the user's environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
            "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"),
            "WANDB_DATA_DIR": str(tmp_path / "wandb_data")}


@pytest.mark.slow
@needs_wandb
def test_offline_run_logs_what_tensorboard_logs(token_files, tmp_path):
    out, env = tmp_path / "run", _wandb_env(tmp_path)
    args = ["parallel.pp=2", "trainer.log_interval=1", "trainer.eval_interval=2",
            "trainer.eval_iters=1", "trainer.wandb.mode=offline", "trainer.wandb.project=test"]
    proc, _ = torchrun(2, "megallama.train", overrides(token_files, out, *args, "trainer.steps=4"),
                       env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(tmp_path.rglob("run-*.wandb"))
    assert len(runs) == 1 and runs[0].parent.parent == out / "wandb", runs  # rank 0's only
    recorded = (out / RUN_ID_FILE).read_text().strip()
    run, history, config = offline_run(runs[0])
    assert run == recorded and runs[0].name == f"run-{recorded}.wandb"

    scalars = read_scalars(out / "tensorboard")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
                "train/peak_memory_gib", "train/skipped_steps", "valid/loss", "valid/perplexity"):
        steps, values = series(history, tag)
        assert values == pytest.approx(scalars[tag], rel=1e-6), tag  # TensorBoard keeps float32
        assert steps == ([1, 2, 3, 4] if tag.startswith("train/") else [2, 4]), (tag, steps)
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert {k: config[k] for k in saved} == saved  # the resolved config, every group
    assert config["trainer"]["wandb"]["mode"] == "offline"

    # resuming from the step-4 checkpoint continues the same W&B run (a second offline segment)
    proc, _ = torchrun(2, "megallama.train", overrides(token_files, out, *args, "trainer.steps=6"),
                       env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    segments = sorted(tmp_path.rglob("run-*.wandb"))
    assert len(segments) == 2 and all(p.name == f"run-{recorded}.wandb" for p in segments)
    later = next(p for p in segments if p != runs[0])
    run, history, _ = offline_run(later)
    assert run == recorded
    assert series(history, "train/loss")[0] == [5, 6]
    assert series(history, "train/loss")[1] == pytest.approx(
        read_scalars(out / "tensorboard")["train/loss"][-2:], rel=1e-6)


@pytest.mark.slow
def test_missing_wandb_stops_every_rank_before_any_collective(token_files, tmp_path):
    """A wandb that does not import: one error line naming the extra, every rank stops at once."""
    shadow = tmp_path / "shadow" / "wandb"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'wandb'\")\n")
    env = {**_wandb_env(tmp_path), "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "shadow"), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc, seconds = torchrun(2, "megallama.train", overrides(
        token_files, tmp_path / "bad", "trainer.wandb.mode=offline"), env=env, timeout=120)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("megallama.train: error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "trainer.wandb.mode=offline needs the wandb package" in errors[0]
    assert "pip install 'megallama[wandb]'" in errors[0]
    assert seconds < 60, f"took {seconds:.0f} s"
    assert not (tmp_path / "bad").exists()
