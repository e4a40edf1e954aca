"""The DeepSpeed boundary: the only package that imports deepspeed (checked by import-linter).

:class:`Engine` builds this rank's pipeline stage, its optimizer and LR schedule, and runs one
training or evaluation step; its optimizer state and step counters are read and written through
its methods, never through DeepSpeed's attributes elsewhere.
"""

import os

import torch

if not torch.cuda.is_available():  # DeepSpeed picks its accelerator when first imported
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from megallama.engine.deepspeed_engine import Engine, MicroBatch, StepResult  # noqa: E402

__all__ = ["Engine", "MicroBatch", "StepResult"]
