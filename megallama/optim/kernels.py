"""Which path runs megallama's optimizer kernels (the AdamW update and the gradient norm's sum of
squares): the Triton kernels of :mod:`megallama.optim.adamw_kernel` or their torch reference.

One rule for every call site (``MasterWeightAdamW`` and ``DistributedAdamW`` decide it once, when
built, from their parameters' device): the environment variable ``MEGALLAMA_KERNELS``

* ``auto`` (default, or unset): Triton on CUDA tensors when Triton is installed, else the reference;
* ``triton``: the Triton kernels on any device. On CPU tensors they run under Triton's interpreter,
  which needs ``TRITON_INTERPRET=1``: this is how the tests run the GPU's code path on a CPU;
* ``reference``: the torch reference everywhere (e.g. to compare a GPU run against it).

Why an override and not the device alone: with the device alone, a machine without a GPU can only
ever test the reference, and the kernel the GPU runs would first execute on a user's GPU.
"""

from __future__ import annotations

import os
import sys

import torch

from megallama.config import ConfigError

ENV = "MEGALLAMA_KERNELS"
MODES = ("auto", "triton", "reference")


def kernel_mode() -> str:
    """``MEGALLAMA_KERNELS`` (``auto`` when unset or empty); ConfigError for any other value."""
    mode = os.environ.get(ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{ENV}={os.environ[ENV]!r}: choose one of {list(MODES)} "
                          "(or leave it unset for auto)")
    return mode


def triton_available() -> bool:
    """Whether ``import triton`` works (it ships with CUDA builds of torch, or ``pip install
    triton``)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton kernels built now run under Triton's interpreter (``TRITON_INTERPRET=1``,
    read when a kernel is built: see :func:`megallama.optim.adamw_kernel.kernels`)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def _imported_compiled() -> bool:
    """Whether ``triton.language`` was imported without the interpreter: its own jit functions
    (``tl.zeros``, ``tl.sum``) are then compiled-only, and interpreted kernels calling them fail."""
    tl = sys.modules.get("triton.language")
    return tl is not None and type(getattr(tl, "zeros", None)).__name__ != "InterpretedFunction"


def use_triton(device: torch.device) -> bool:
    """Whether the optimizer kernels for tensors on ``device`` run as Triton kernels (the rule of
    the module docstring). ``triton`` that cannot run raises ConfigError saying what to do."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "auto":
        return device.type == "cuda" and triton_available()
    if not triton_available():
        raise ConfigError(f"{ENV}=triton: Triton is not installed; pip install triton (or unset "
                          f"{ENV})")
    if device.type != "cuda" and (not interpreting() or _imported_compiled()):
        raise ConfigError(f"{ENV}=triton on {device.type} tensors: Triton runs them only under "
                          "its interpreter; set TRITON_INTERPRET=1 as well, in the environment "
                          "before triton is imported (slow: for tests)")
    return True
