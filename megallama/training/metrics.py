"""Training throughput accounting and reporting: FLOPs per token, device peaks (for MFU), peak
memory, a TensorBoard (and Weights & Biases) writer, a console progress bar and the one-line log
format.

Only one rank reports: :class:`MetricsWriter` and :class:`Progress` take ``enabled`` so every rank
can construct them unconditionally and the non-reporting ones do nothing.
"""

from __future__ import annotations

import re
import resource
import sys
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import torch

from megallama.config import ModelConfig
from megallama.config.train_config import TrainConfig
from megallama.data.progress_bar import progress_bar, write_line
from megallama.training.tracking import WandbRun, open_wandb_run

GIB = 1024**3


# ---- FLOPs and peaks ----------------------------------------------------------------------------
def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: ``6 * N' + 12 * L * h * T``.

    ``N'`` is every parameter except the input embedding (a lookup, no multiply; the output head
    is a matmul and counts), ``6 N'`` the weight matmuls (2 forward + 4 backward per weight per
    token), and ``12 L h T`` the attention score and value matmuls over a ``T``-token context
    (``L`` layers, model width ``h``), without discounting the causal mask, as in the PaLM paper's
    MFU definition. Activation recomputation is deliberately not counted: MFU measures useful work.
    """
    n_prime = cfg.num_parameters(include_embedding=False)
    return 6.0 * n_prime + 12.0 * cfg.n_layers * cfg.dim * seq_len


# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, FLOP/s, matched in
# order against torch.cuda.get_device_name(), so the more specific variants come first.
_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bPCIe\b", 756e12),
    (r"\bH100\b.*\bNVL\b", 835e12),
    (r"\bH100\b", 989e12),  # SXM5, reported as "NVIDIA H100 80GB HBM3"
    (r"\bH800\b.*\bPCIe\b", 756e12),
    (r"\bH800\b", 989e12),
    (r"\bH200\b.*\bNVL\b", 835e12),
    (r"\bG?H200\b", 989e12),
    (r"\bB200\b", 2250e12),
    (r"\bA100\b", 312e12),
    (r"\bA800\b", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL40\b", 181e12),
    (r"\bL4\b", 121e12),
)


def peak_flops_for_name(name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU by its CUDA device name; None when it is not in the table."""
    for pattern, flops in _BF16_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return flops
    return None


def device_peak_flops(device: torch.device | str, precision: str) -> float | None:
    """Peak FLOP/s for MFU, or None when there is no honest figure.

    Known for bf16 on the GPUs in the table above (H100 SXM 989e12, H100 PCIe 756e12, H200 989e12,
    A100 312e12, L40S 362e12, ...). None on CPU, on unknown GPUs, and for fp32: fp32 matmuls run as
    TF32 or as true FP32 depending on ``torch.backends.cuda.matmul.allow_tf32``, peaks that differ
    by about 8x, so no single number would make MFU meaningful.
    """
    device = torch.device(device)
    if device.type != "cuda" or precision != "bf16" or not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory of this process on ``device``.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only; the caching allocator reserves more).
    CPU: the process's peak resident set size (``ru_maxrss``), which includes the interpreter,
    libraries and every allocation, not only tensors.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)  # bytes on macOS, else KiB


# ---- one-line log -------------------------------------------------------------------------------
def _gib(value: float) -> str:
    return f"{value / GIB:.1f}GiB"


def _count(value: float) -> str:
    return str(int(value))


# metric key -> (label, formatter); known keys print in this order, then any others as given.
# Some quantities have two accepted keys (a unit in the name or not): tflops/tflops_per_device,
# mem_bytes/peak_memory_gib, skipped/skipped_steps.
METRIC_FORMATS: dict[str, tuple[str, Any]] = {
    "loss": ("loss", "{:.4f}".format),
    "val_loss": ("val_loss", "{:.4f}".format),
    "val_ppl": ("val_ppl", "{:.2f}".format),
    "lr": ("lr", "{:.2e}".format),
    "grad_norm": ("grad_norm", "{:.3f}".format),
    "tokens_per_s": ("tok/s", "{:.0f}".format),
    "data_tokens_per_s": ("data tok/s", "{:.0f}".format),
    "tflops": ("TFLOP/s", "{:.2f}".format),
    "tflops_per_device": ("TFLOP/s", "{:.2f}".format),
    "mfu": ("MFU", "{:.1%}".format),
    "mem_bytes": ("mem", _gib),
    "peak_memory_gib": ("mem", "{:.1f}GiB".format),
    "step_time": ("step_time", "{:.2f}s".format),
    "skipped": ("skipped", _count),
    "skipped_steps": ("skipped", _count),
}


def format_metrics(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``step 10/300 | loss 5.1234 | lr 1.00e-03 | grad_norm 1.234 | tok/s 12345 | ...``.

    Keys of :data:`METRIC_FORMATS` use their label and format (``tflops`` is TFLOP/s per device,
    ``mfu`` a fraction, ``mem_bytes`` bytes); other keys follow as ``key value``. None is omitted.
    Values may be Python numbers or 0-d tensors.
    """
    parts = [f"step {step}/{total}"]
    for key, (label, fmt) in METRIC_FORMATS.items():
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{label} {fmt(float(value))}")
    for key, value in metrics.items():
        if key in METRIC_FORMATS or value is None:
            continue
        if isinstance(value, torch.Tensor):
            value = value.item()
        if isinstance(value, float):
            parts.append(f"{key} {value:.4g}")
        else:
            parts.append(f"{key} {value}")
    return " | ".join(parts)


# ---- TensorBoard (and W&B) -----------------------------------------------------------------------
class MetricsWriter:
    """Scalars to TensorBoard event files under ``log_dir`` and, when ``wandb`` is given, to that
    Weights & Biases run at the same steps (:mod:`megallama.training.tracking`).

    Does nothing when not ``enabled`` (the ranks that do not report), and writes no TensorBoard
    files when ``log_dir`` is None (TensorBoard switched off), so callers never branch on either.
    """

    def __init__(self, log_dir: Path | None, enabled: bool, wandb: WandbRun | None = None) -> None:
        self._wandb = wandb if enabled else None
        self.enabled = enabled and (log_dir is not None or self._wandb is not None)
        self._writer: Any = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

            Path(log_dir).mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(log_dir=str(log_dir))

    @classmethod
    def for_run(cls, cfg: TrainConfig, enabled: bool, resumed: bool = False) -> MetricsWriter:
        """The writer of a training run: TensorBoard under ``<trainer.output_dir>/tensorboard``
        (``trainer.tensorboard``) and W&B as ``trainer.wandb`` says, opened only where
        ``enabled`` (the reporting rank); ``resumed`` continues the run's W&B run."""
        t = cfg.trainer
        log_dir = Path(t.output_dir) / "tensorboard" if t.tensorboard else None
        use_wandb = enabled and t.wandb.mode != "disabled"
        return cls(log_dir, enabled, wandb=open_wandb_run(cfg, resumed) if use_wandb else None)

    def scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Record each value (numbers or 0-d tensors; None skipped) as a scalar at ``step``."""
        if not self.enabled:
            return
        floats = {tag: float(v.item() if isinstance(v, torch.Tensor) else v)
                  for tag, v in values.items() if v is not None}
        if self._writer is not None:
            for tag, value in floats.items():
                self._writer.add_scalar(tag, value, global_step=step)
        if self._wandb is not None:
            self._wandb.log(step, floats)

    def flush(self) -> None:
        """Write pending TensorBoard events to disk (they are otherwise flushed every two minutes;
        W&B streams its own)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close TensorBoard, finish the W&B run; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# ---- console progress ----------------------------------------------------------------------------
class Progress:
    """Training progress on the console: a tqdm bar of steps (done/total, percent, it/s or s/it,
    elapsed, ETA and tokens/s) with :meth:`log` lines printed above it.

    The bar is drawn only on a terminal (see :func:`megallama.data.progress_bar.progress_bar`):
    under a job scheduler the :meth:`log` lines (``trainer.log_interval``) are the progress report.
    ``initial`` is the step a resumed run starts from; rates count only the steps of this process
    and average over all of its time, evaluations and saves included, so the ETA accounts for
    them. With ``bar=False`` (``trainer.progress=false``) only :meth:`log` lines are printed.
    Nothing is printed when not ``enabled`` (every rank but the reporting one).
    """

    def __init__(
        self,
        total_steps: int,
        enabled: bool,
        stream: TextIO | None = None,
        *,
        initial: int = 0,
        bar: bool = True,
        tokens_per_step: int = 0,
        force: bool = False,
    ) -> None:
        self.total = max(1, int(total_steps))
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.initial = self.step = int(initial)
        self.tokens_per_step = int(tokens_per_step)
        self._bar = progress_bar(
            self.total, enabled=enabled and bar, file=self.stream, force=force,
            initial=self.initial, unit="step", desc="train", smoothing=0,
        )

    @property
    def drawn(self) -> bool:
        """Whether a bar is being drawn (enabled, wanted and on a terminal, or forced)."""
        return not self._bar.disable

    def update(self, step: int) -> None:
        """Record that ``step`` steps are done (absolute, not an increment) and redraw."""
        self.step = int(step)
        if not self.drawn:
            return
        elapsed = self._bar.format_dict["elapsed"]
        if self.tokens_per_step and elapsed > 0 and self.step > self.initial:
            tok_s = (self.step - self.initial) * self.tokens_per_step / elapsed
            self._bar.set_postfix_str(f"{tok_s:,.0f} tok/s", refresh=False)
        self._bar.update(self.step - self._bar.n)

    def log(self, line: str) -> None:
        """Print ``line`` on its own line, keeping the bar (if any) below it."""
        if self.enabled:
            write_line(line, self.stream)

    def close(self) -> None:
        """Leave the final bar on its own line; safe to call twice."""
        self._bar.close()


__all__ = [
    "GIB",
    "METRIC_FORMATS",
    "MetricsWriter",
    "Progress",
    "device_peak_flops",
    "flops_per_token",
    "format_metrics",
    "peak_flops_for_name",
    "peak_memory_bytes",
]
