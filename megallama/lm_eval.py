"""``python -m megallama.lm_eval`` (``megallama-lm-eval``): lm-evaluation-harness's own command
line with the model ``megallama`` registered, for benchmark scores of a checkpoint at any TP/PP:

    torchrun --nproc-per-node 2 -m megallama.lm_eval --model megallama \\
        --model_args checkpoint=runs/7b/checkpoints,tp=2 --tasks hellaswag --batch_size 8

lm-eval (0.4.13) finds models only in its own registry and has no plugin discovery for model
backends, so ``lm_eval --model megallama`` cannot see this package; this module registers the
model (:mod:`megallama.inference.harness`) and then runs lm-eval's command line unchanged, every
option included. A missing lm-eval is one line naming the extra to install, exit status 2; so is
a bad ``--model_args`` key or value, checkpoint or layout, or a ``--device`` without its device
(:mod:`megallama.inference.harness_args`), found on every rank before any weight is read.
"""

from __future__ import annotations

import importlib
import sys

from megallama.checkpoint.atomic import CheckpointError
from megallama.config import ConfigError
from megallama.parallel.runtime import run_command

PROG = "megallama-lm-eval"
EXTRA = "pip install 'megallama[eval]'"
INPUT_ERRORS = (ConfigError, CheckpointError, OSError)


def missing_dependency() -> str | None:
    """The first package the ``megallama`` lm-eval model needs that cannot be imported, if any."""
    for name in ("lm_eval", "transformers"):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def _run() -> int:
    # imported here, after the check in main(): both need lm-eval, an optional dependency
    from lm_eval.__main__ import cli_evaluate

    import megallama.inference.harness  # noqa: F401  (registers the model "megallama")

    cli_evaluate()
    return 0


def main() -> int:
    missing = missing_dependency()
    if missing is not None:
        print(f"{PROG}: error: {missing} is not installed; the lm-eval model 'megallama' needs "
              f"it: {EXTRA}", file=sys.stderr)
        return 2
    return run_command(PROG, _run, INPUT_ERRORS)


if __name__ == "__main__":
    sys.exit(main())
