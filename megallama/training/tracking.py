"""Weights & Biases beside TensorBoard (``trainer.wandb.*``): one W&B run per training run, opened
by the reporting rank (global rank 0) only, logging the scalars :class:`MetricsWriter
<megallama.training.metrics.MetricsWriter>` writes to TensorBoard, at the same steps (the training
step is W&B's ``step``), with the resolved configuration as the run's config.

``wandb`` is an optional dependency (``pip install 'megallama[wandb]'``), imported here only when
``trainer.wandb.mode`` is not ``disabled``; :func:`megallama.config.validate.check_wandb` has
already checked on every rank, before any collective, that it imports.

Resuming: the W&B run id is kept in ``<trainer.output_dir>/wandb_run_id``. A run that resumes from
a checkpoint continues that W&B run (``resume="allow"``); a run that starts from step 0 starts a
new W&B run and records its id there. W&B keeps a run's steps increasing: rows logged again for
steps it already has (those between the checkpoint and a crash) are dropped, not overwritten.

Failures: ``trainer.wandb.mode=online`` without an API key is found before torch.distributed
starts (:func:`check_wandb_login`, run by preflight on every rank, reading where wandb itself
looks: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the netrc file, wandb's settings files;
no network). A W&B run that cannot start later (a refused key, no network) is a
:class:`WandbStartError`, one line naming ``trainer.wandb.mode=offline``, and leaves neither a
new ``wandb_run_id`` nor the ``wandb/`` folder that the attempt created.
"""

from __future__ import annotations

import configparser
import netrc
import os
import secrets
import shutil
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from omegaconf import OmegaConf

from megallama.config import ConfigError
from megallama.config.train_config import TrainConfig

RUN_ID_FILE = "wandb_run_id"
DEFAULT_WANDB_HOST = "api.wandb.ai"
OFFLINE_FIX = ("set trainer.wandb.mode=offline (the run is kept under <dir>/wandb; upload it later "
               "with `wandb sync`)")


class WandbStartError(ConfigError):
    """The W&B run could not be opened (no API key, a refused key, no network): one line."""


def wandb_dir(cfg: TrainConfig) -> Path:
    """Where W&B writes its files (in a ``wandb/`` folder below): ``trainer.wandb.dir``, or
    ``trainer.output_dir`` when that is null."""
    return Path(cfg.trainer.wandb.dir or cfg.trainer.output_dir)


def run_id(output_dir: Path, resumed: bool, record: bool = True) -> str:
    """The W&B run id of this training run: the recorded one when resuming from a checkpoint and
    there is one, else a new id, recorded in ``output_dir/wandb_run_id`` (when ``record``; else
    by :func:`record_run_id` once the run has opened)."""
    path = Path(output_dir) / RUN_ID_FILE
    if resumed and path.is_file() and (recorded := path.read_text().strip()):
        return recorded
    alphabet = string.ascii_lowercase + string.digits
    new = "".join(secrets.choice(alphabet) for _ in range(8))
    if record:
        record_run_id(output_dir, new)
    return new


def record_run_id(output_dir: Path, value: str) -> None:
    """Keep ``value`` as the W&B run id that a resumed run continues."""
    path = Path(output_dir) / RUN_ID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")


def _settings_files() -> list[Path]:
    """wandb's settings files: the global one (``$WANDB_CONFIG_DIR/settings`` or
    ``~/.config/wandb/settings``) and the workspace's (``./wandb/settings``)."""
    config_dir = os.environ.get("WANDB_CONFIG_DIR")
    home = Path(config_dir).expanduser() if config_dir else Path("~/.config/wandb").expanduser()
    return [home / "settings", Path("wandb") / "settings"]


def _settings_values(key: str) -> list[str]:
    """The values of ``key`` in wandb's settings files (section ``default``); unreadable or
    malformed files count as empty, as wandb treats them."""
    values = []
    for path in _settings_files():
        parser = configparser.ConfigParser()
        try:
            parser.read(path)
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        if value := parser.get("default", key, fallback=""):
            values.append(value)
    return values


def _netrc_path() -> Path:
    """The netrc file wandb reads: ``$NETRC``, else ``~/.netrc`` (or ``~/_netrc`` if only that
    one exists)."""
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    unix, windows = Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()
    return windows if windows.exists() and not unix.exists() else unix


def wandb_key_source() -> str | None:
    """Where an online W&B run would find its credentials (an environment variable, the netrc
    file, a settings file), or None when there are none. Reads files only, never the network;
    a key that is present but refused is found later, by :func:`open_wandb_run`."""
    for variable in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        if os.environ.get(variable):
            return variable
    if _settings_values("api_key"):
        return "wandb settings"
    path = _netrc_path()
    try:
        entries = netrc.netrc(path)
    except (OSError, netrc.NetrcParseError):
        return None
    if any((creds := entries.authenticators(host)) and creds[2] for host in _wandb_hosts()):
        return str(path)
    return None


def _wandb_hosts() -> list[str]:
    """The W&B servers a key could be for, the one wandb talks to first: ``WANDB_BASE_URL``'s,
    the settings files' ``base_url``, W&B's own."""
    urls = [os.environ.get("WANDB_BASE_URL", ""), *_settings_values("base_url")]
    hosts = [urlsplit(u).netloc for u in urls if u] + [DEFAULT_WANDB_HOST]
    return [h for i, h in enumerate(hosts) if h and h not in hosts[:i]]


def check_wandb_login(cfg: TrainConfig) -> None:
    """``trainer.wandb.mode=online`` needs W&B credentials: without any, wandb.init fails only
    after torch.distributed has started, on rank 0 alone. Raises ConfigError (one line)."""
    if cfg.trainer.wandb.mode != "online" or wandb_key_source() is not None:
        return
    raise ConfigError(
        f"trainer.wandb.mode=online but no W&B API key was found (WANDB_API_KEY is not set and "
        f"{_netrc_path()} has no entry for {_wandb_hosts()[0]}): run `wandb login` or set "
        f"WANDB_API_KEY, or {OFFLINE_FIX}")


def resolved_config(cfg: TrainConfig) -> dict[str, Any]:
    """The configuration as plain data, the same tree as the run's ``config.yaml``."""
    tree = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    assert isinstance(tree, dict)
    return tree  # type: ignore[return-value]


class WandbRun:
    """An open W&B run: :meth:`log` scalars at a step, :meth:`finish` once."""

    def __init__(self, run: Any) -> None:
        self._run = run

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` (plain floats) at ``step``; calls with the same step form one row."""
        if self._run is not None and values:
            self._run.log(dict(values), step=step)

    def finish(self) -> None:
        """Write the last row and close the run; safe to call twice."""
        if self._run is not None:
            self._run.finish()
            self._run = None


def open_wandb_run(cfg: TrainConfig, resumed: bool) -> WandbRun:
    """Start (or, when ``resumed`` and an id is recorded, continue) this training run's W&B run,
    as ``trainer.wandb`` says. Call on the reporting rank only."""
    import wandb  # optional dependency (megallama[wandb]); checked by config validation

    w, out = cfg.trainer.wandb, Path(cfg.trainer.output_dir)
    directory = wandb_dir(cfg)
    created = _first_missing(directory / "wandb")  # removed again if the run does not open
    directory.mkdir(parents=True, exist_ok=True)
    run_id_value = run_id(out, resumed, record=False)
    try:
        run = wandb.init(
            project=w.project, entity=w.entity, name=w.name or out.resolve().name, mode=w.mode,
            dir=str(directory), id=run_id_value, resume="allow", config=resolved_config(cfg),
        )
    except Exception as e:  # wandb's UsageError, CommError, AuthenticationError, timeouts...
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        reason = " ".join(str(e).split())[:400] or type(e).__name__
        raise WandbStartError(
            f"trainer.wandb.mode={w.mode}: W&B could not start the run ({reason}); check the API "
            f"key (`wandb login`) and the network, or {OFFLINE_FIX}") from None
    record_run_id(out, run_id_value)
    return WandbRun(run)


def _first_missing(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if it all exists)."""
    missing = None
    while not os.path.lexists(path) and path != path.parent:
        missing, path = path, path.parent
    return missing


__all__ = ["RUN_ID_FILE", "WandbRun", "WandbStartError", "check_wandb_login", "open_wandb_run",
           "record_run_id", "resolved_config", "run_id", "wandb_dir", "wandb_key_source"]
