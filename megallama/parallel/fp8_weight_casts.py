"""One FP8 linear's weight casts for a whole training step, made before it and held as buffers:
what compiled blocks (``parallel.compile_blocks``) read instead of casting the weight, and
MAX-reducing its amax over TP, at every use. Eager blocks use
:func:`megallama.parallel.fp8.weights_fixed`'s lazy cache instead. The casts are those the
matmul's first use would make (:mod:`megallama.parallel.fp8_matmul`: same amaxes, scales and
bits). Loaded with torchao (the optional extra ``megallama[fp8]``) through
:func:`megallama.parallel.fp8.load_weight_casts`.
"""

from __future__ import annotations

import torch
from torchao.float8.config import CastConfig, Float8LinearConfig

# through the module (not names bound here): one definition of each cast, which tests count
from megallama.parallel import fp8_matmul as matmul


def _weight_roles(c: Float8LinearConfig) -> list[tuple[tuple[str, str], CastConfig, int | None]]:
    """The weight casts one step needs, as (buffer names, cast, amax axis of ``weight.t()``):
    the forward's; and the grad-input gemm's unless it is the forward's (tensorwise)."""
    cw, cg = c.cast_config_weight, c.cast_config_weight_for_grad_input
    roles = [(("scale", "data"), cw, matmul._axis(cw, 0))]
    if not (matmul._tensorwise(cw) and cg == cw):
        roles.append((("grad_scale", "grad_data"), cg, matmul._axis(cg, -1)))
    return roles


class StepCasts(torch.nn.Module):
    """One FP8 linear's weight casts for the current training step, as buffers -- so a compiled
    block reads them as graph inputs (updated in place each step: no recompilation) instead of
    casting the weight, and MAX-reducing its amax, at every use. Non-persistent (never in a
    checkpoint) and empty until the first :func:`cast_weights`; used only while ``valid``
    (:func:`megallama.parallel.fp8.step_casts` sets it for one step)."""

    def __init__(self) -> None:
        super().__init__()
        self.valid = False
        for name in ("scale", "data", "grad_scale", "grad_data"):
            self.register_buffer(name, None, persistent=False)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """(scale, data[, grad_scale, grad_data]): data in the weight's [N, K] layout."""
        if self.grad_data is None:
            return self.scale, self.data
        return self.scale, self.data, self.grad_scale, self.grad_data

    def store(self, names: tuple[str, str], scale: torch.Tensor, data: torch.Tensor) -> None:
        """Write a cast into its buffers, in place when they fit (the compiled graphs keep
        reading the same tensors), else as new ones (the first step)."""
        for name, t in zip(names, (scale, data), strict=True):
            buf = getattr(self, name)
            if buf is None or (buf.shape, buf.dtype, buf.device) != (t.shape, t.dtype, t.device):
                setattr(self, name, t.contiguous())
            else:
                buf.copy_(t)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)


@torch.no_grad()
def cast_weights(layers: list[torch.nn.Module]) -> None:
    """Cast every weight of ``layers`` (converted linears: ``fp8_matmul``, ``fp8_casts``) into
    its :class:`StepCasts`, as the first use in a step would cast it (same amaxes, scales and
    bits), with ONE MAX all-reduce per TP group for all the amaxes that cross a shard."""
    batches: dict[tuple[int, int], list] = {}
    for layer in layers:
        spec = layer.fp8_matmul
        batches.setdefault((id(spec.group), id(spec.config)), []).append(layer)
    for batch in batches.values():
        spec = batch[0].fp8_matmul
        roles = _weight_roles(spec.config)
        items = [(layer.weight.t(), cast, axis, layer.fp8_matmul.sharding.weight_t)
                 for layer in batch for _, cast, axis in roles]
        scales = iter(matmul._scales(items, spec.group, spec.config.round_scales_to_power_of_2))
        for layer in batch:
            for names, cast, axis in roles:
                scale = next(scales)
                assert scale is not None, "FP8 weight casts with scaling disabled"
                f8 = matmul._cast(layer.weight.t(), scale, cast, layer.fp8_matmul.mm, matmul.WEIGHT, axis)
                layer.fp8_casts.store(names, scale, f8._data.t())
            layer.fp8_casts.valid = True
