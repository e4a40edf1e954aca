"""The FP8 matmul of one tensor-parallel linear: torchao's float8 training with TP-aware scales.

torchao's ``Float8Linear`` computes each scale from the tensor it sees. Our TP is hand-written, so a
rank sees only its shard of some operands; this module does what torchao's
``matmul_with_hp_or_float8_args`` does (the same casts, configs, roles and gemms, so at tp = 1 it is
bit-identical to ``torchao.float8.convert_to_float8_training``) but reduces with MAX over the TP
group every amax whose extent crosses a sharded dimension. The rule, per operand of the three
gemms, is derived in :mod:`megallama.parallel.fp8`, which is the module to import (this one needs
torchao, the optional extra ``megallama[fp8]``).

What backward keeps: the input as the forward's fp8 copy when the recipe casts it once for both of
its gemms (tensorwise), else the high-precision input; the weight as itself (a parameter, no extra
memory) plus, for tensorwise, its forward scale, so backward re-casts it without a collective.
Within a training step (:func:`megallama.parallel.fp8.weights_fixed`) the weight's cast -- scale
and fp8 copy -- is made once, in the first micro-batch, and every later forward, recomputed
forward and backward of the step reuses it (bit-identical: the weight does not change).
Compiled blocks cannot use that cache; for them
:func:`megallama.parallel.fp8_weight_casts.cast_weights` (called by
:func:`megallama.parallel.fp8.step_casts` before the step) makes every weight's casts at once,
eagerly, into the layer's ``StepCasts`` buffers, which the matmul takes as inputs.
Under sequence parallelism tensorwise casts the input's sequence shard with the whole input's
scale before the all-gather (:func:`sharded_input_forward`), which then moves fp8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
import torch.distributed._functional_collectives as funcol
from torchao.float8.config import (
    CastConfig,
    Float8LinearConfig,
    ScalingGranularity,
    ScalingType,
)
from torchao.float8.float8_training_tensor import (
    Float8TrainingTensor,
    GemmInputRole,
    LinearMMConfig,
    ScaledMMConfig,
    hp_tensor_and_scale_to_float8,
)
from torchao.float8.float8_utils import amax_to_scale, tensor_to_amax

from megallama.parallel import fp8
from megallama.parallel.mappings import Group, group_size

if TYPE_CHECKING:
    from megallama.parallel.fp8_weight_casts import StepCasts

INPUT, WEIGHT, GRAD_OUTPUT = GemmInputRole.INPUT, GemmInputRole.WEIGHT, GemmInputRole.GRAD_OUTPUT


@dataclass(frozen=True)
class Sharding:
    """Which dimension of each 2-D gemm operand is split over the TP group (None: replicated):
    ``input`` [T, K], ``weight_t`` [K, N] (the transposed weight), ``grad_output`` [T, N]."""

    input: int | None
    weight_t: int | None
    grad_output: int | None


COLUMN = Sharding(input=None, weight_t=1, grad_output=1)  # N split: weight rows, output columns
ROW = Sharding(input=1, weight_t=0, grad_output=None)  # K split: weight columns, input columns


def mm_config(config: Float8LinearConfig) -> LinearMMConfig:
    """The three gemms' settings, as ``torchao.float8.Float8Linear.__init__`` builds them."""
    def gemm(c):
        return ScaledMMConfig(config.emulate, c.use_fast_accum, False, config.pad_inner_dim)
    return LinearMMConfig(gemm(config.gemm_config_output), gemm(config.gemm_config_grad_input),
                          gemm(config.gemm_config_grad_weight))


def _axis(cast: CastConfig, axis: int) -> int | None:
    """torchao's ``get_maybe_axiswise_dim``: the amax axis for rowwise casts, None for tensorwise."""
    return axis if cast.scaling_granularity is ScalingGranularity.AXISWISE else None


def crosses_shard(cast: CastConfig, axis: int | None, shard_dim: int | None) -> bool:
    """Whether the amax of this cast covers elements on other TP ranks: a tensorwise scale of a
    sharded operand, or a rowwise scale whose reduced axis is the sharded one."""
    if shard_dim is None or cast.scaling_type is ScalingType.DISABLED:
        return False
    return axis is None or axis % 2 == shard_dim


@torch.no_grad()
def _scales(items: list[tuple[torch.Tensor, CastConfig, int | None, int | None]], group: Group,
            round_pow2: bool) -> list[torch.Tensor | None]:
    """Scales of (tensor, cast, axis, shard dim) casts; every amax that crosses a shard is MAX-
    reduced over ``group``, all of them in one all-reduce. None for disabled casts."""
    amaxes: list[torch.Tensor | None] = [
        None if cast.scaling_type is ScalingType.DISABLED
        else tensor_to_amax(t, False, None, cast.scaling_granularity, axis)
        for t, cast, axis, _ in items]
    shared = [i for i, (_, cast, axis, shard) in enumerate(items)
              if crosses_shard(cast, axis, shard)] if group_size(group) > 1 else []
    if shared:
        flat = torch.cat([amaxes[i].reshape(-1).float() for i in shared])
        # the functional collective (as torchao's own amax reduction): traceable by torch.compile
        flat = funcol.wait_tensor(funcol.all_reduce(flat, "max", group))
        for i, part in zip(shared, flat.split([amaxes[i].numel() for i in shared]), strict=True):
            amaxes[i] = part.view(amaxes[i].shape)
    return [None if a is None else amax_to_scale(a, cast.target_dtype, round_pow2)
            for a, (_, cast, _, _) in zip(amaxes, items, strict=True)]


def _cast(t: torch.Tensor, scale: torch.Tensor | None, cast: CastConfig, mm: LinearMMConfig,
          role: GemmInputRole, axis: int | None) -> torch.Tensor:
    if scale is None:  # scaling disabled: this gemm runs in high precision
        return t
    return hp_tensor_and_scale_to_float8(t, scale, cast.target_dtype, mm, role, axis)


def _tensorwise(cast: CastConfig) -> bool:
    return (cast.scaling_type is ScalingType.DYNAMIC
            and cast.scaling_granularity is ScalingGranularity.TENSORWISE)


def casts_input_once(config: Float8LinearConfig) -> bool:
    """Whether the recipe casts a linear's input once, dynamic tensorwise, for both the forward
    and the grad-weight gemm (torchao's ``tensorwise``): then the fp8 copy is what backward
    keeps, and under SP the sequence shard can be cast before it is gathered
    (:func:`sharded_input_forward`)."""
    ci = config.cast_config_input
    return _tensorwise(ci) and config.cast_config_input_for_grad_weight == ci


def _forward_scales(items: list[tuple[torch.Tensor, CastConfig, int | None, int | None]],
                    weights: list[torch.Tensor], spec: Float8Matmul) -> tuple[list, list]:
    """The scales of the input casts ``items`` and, per weight, its forward cast made earlier in
    this step (:func:`megallama.parallel.fp8.weights_fixed`) or else (the scale to make it with,
    None): the amaxes of the weights not yet cast join the items' all-reduce (one collective)."""
    c = spec.config
    ax_w = _axis(c.cast_config_weight, 0)
    casts: list = [fp8.cached_cast(w, "forward") for w in weights]
    todo = [i for i, cast in enumerate(casts) if cast is None]
    items = items + [(weights[i].t(), c.cast_config_weight, ax_w, spec.sharding.weight_t)
                     for i in todo]
    scales = _scales(items, spec.group, c.round_scales_to_power_of_2)
    for i, scale in zip(todo, scales[len(items) - len(todo):], strict=True):
        casts[i] = (scale, None)  # to be cast with this scale (:func:`_weight_cast`)
    return scales[:len(items) - len(todo)], casts


def _weight_cast(weight: torch.Tensor, cast: tuple, spec: Float8Matmul) -> tuple:
    """(scale, fp8 copy of ``weight.t()``): ``cast`` if made earlier in this step, else -- a
    (scale, None) of :func:`_forward_scales` -- made here with that scale, kept for the step."""
    if cast[1] is not None:
        return cast
    c = spec.config
    made = (cast[0], _cast(weight.t(), cast[0], c.cast_config_weight, spec.mm, WEIGHT,
                           _axis(c.cast_config_weight, 0)))
    fp8.store_cast(weight, "forward", made)
    return made


def _float8(data: torch.Tensor, scale: torch.Tensor, cast: CastConfig, mm: LinearMMConfig,
            axis: int | None, dtype: torch.dtype) -> Float8TrainingTensor:
    """The weight cast ``_cast(weight.t(), scale, cast, mm, WEIGHT, axis)`` made earlier:
    ``data`` its fp8 bits (as ``weight.t()``'s view), ``dtype`` the weight's."""
    return Float8TrainingTensor(data, scale, dtype, mm, WEIGHT, axis)


def _given_casts(step: tuple[torch.Tensor, ...], dtype: torch.dtype, spec: Float8Matmul
                 ) -> tuple[tuple, tuple]:
    """The forward's (scale, fp8 copy of ``weight.t()``) and backward's (scale, data) of a
    layer's :meth:`StepCasts.tensors`: tensorwise backward reuses the forward's cast."""
    cw = spec.config.cast_config_weight
    w_cast = (step[0], _float8(step[1].t(), step[0], cw, spec.mm, _axis(cw, 0), dtype))
    return w_cast, tuple(step[2:4] if len(step) > 2 else step[:2])


@dataclass(frozen=True)
class Float8Matmul:
    """``x @ weight.T`` of one TP linear in FP8 (the callable a TP layer's ``fp8_matmul`` holds)."""

    config: Float8LinearConfig
    sharding: Sharding
    group: Group = None

    @property
    def mm(self) -> LinearMMConfig:
        return mm_config(self.config)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 casts: StepCasts | None = None) -> torch.Tensor:
        """``casts``: the layer's casts of this step (:class:`StepCasts`), used while valid."""
        step = casts.tensors() if casts is not None and casts.valid else ()
        return _Float8TPMatmul.apply(x, weight, self, *step)


class _Float8TPMatmul(torch.autograd.Function):
    """torchao's ``matmul_with_hp_or_float8_args`` for high-precision arguments, with the TP
    reductions of :func:`_scales` (and the tensorwise casts shared between gemms)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, spec: Float8Matmul,
                *step: torch.Tensor) -> torch.Tensor:
        """``step``: the weight's casts made before this step's first forward
        (:meth:`StepCasts.tensors`), or nothing: then cast here (or taken from
        :func:`megallama.parallel.fp8.weights_fixed`'s cache)."""
        c, sh = spec.config, spec.sharding
        x2 = x.reshape(-1, x.shape[-1])
        ax_in = _axis(c.cast_config_input, -1)
        ctx.n_step, back = len(step), None
        if step:
            (s_in,) = _scales([(x2, c.cast_config_input, ax_in, sh.input)], spec.group,
                              c.round_scales_to_power_of_2)
            w_cast, back = _given_casts(step, weight.dtype, spec)
        else:
            (s_in,), (w_cast,) = _forward_scales([(x2, c.cast_config_input, ax_in, sh.input)],
                                                 [weight], spec)
            w_cast = _weight_cast(weight, w_cast, spec)
        x8 = _cast(x2, s_in, c.cast_config_input, spec.mm, INPUT, ax_in)
        return _Float8TPMatmul.gemm(ctx, x8, x2, x.shape, x.dtype, weight, w_cast, spec, back)

    @staticmethod
    def gemm(ctx, x8: torch.Tensor, x2: torch.Tensor | None, shape: torch.Size,
             dtype: torch.dtype, weight: torch.Tensor, w_cast: tuple, spec: Float8Matmul,
             back: tuple | None = None) -> torch.Tensor:
        """The forward gemm on the cast input ``x8`` [T, K] (``x2``: the high-precision input,
        kept by recipes that cast it again for the grad-weight gemm; ``shape``: the input's);
        saves what backward needs in ``ctx`` (``back``: the step's (scale, data) of the
        weight's grad-input cast, :func:`_given_casts`)."""
        c = spec.config
        s_w, w8 = w_cast
        out = torch.mm(x8, w8)
        ctx.spec, ctx.shape, ctx.dtype = spec, shape, dtype
        ctx.param = weight  # the cache's key in backward (saved tensors come back as new objects)
        # tensorwise: the fp8 input serves the grad-weight gemm too; the weight's scale is saved
        ctx.keep_fp8 = keep_fp8 = casts_input_once(c)
        w_scale = s_w if _tensorwise(c.cast_config_weight) and \
            c.cast_config_weight_for_grad_input == c.cast_config_weight else None
        saved = (x8._data, x8._scale) if keep_fp8 else (x2, None)
        ctx.save_for_backward(*saved, weight, w_scale, *(back or ()))
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # read once (checkpointing); ``back``: the step's grad-input cast of the weight, if given
        x_saved, x_scale, weight, w_scale, *back = ctx.saved_tensors
        grad_x, go8_gw = _Float8TPMatmul.grad_input(ctx, grad_out, weight, w_scale,
                                                    tuple(back) or None)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _Float8TPMatmul.grad_weight(ctx, go8_gw, x_saved, x_scale)
        return (grad_x, grad_w, None) + (None,) * getattr(ctx, "n_step", 0)

    @staticmethod
    def grad_input(ctx, grad_out: torch.Tensor, weight: torch.Tensor,
                   w_scale: torch.Tensor | None, back: tuple | None = None
                   ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Backward's first half, which reads no saved input: the grad-output casts (one
        all-reduce of the amaxes that cross a shard) and the grad-input gemm (None unless
        ``ctx.needs_input_grad[0]``); returns it and the grad output cast for the grad-weight
        gemm. Sequence parallelism re-gathers the input meanwhile (parallel/sequence_linears.py).
        ``back``: the step's (scale, data) of the weight's grad-input cast (:class:`StepCasts`)."""
        spec = ctx.spec
        c, sh, mm, pow2 = spec.config, spec.sharding, spec.mm, spec.config.round_scales_to_power_of_2
        go = grad_out.reshape(-1, grad_out.shape[-1])
        w_t = weight.t()
        cg, cw, cgw = (c.cast_config_grad_output, c.cast_config_weight_for_grad_input,
                       c.cast_config_grad_output_for_grad_weight)
        ax_g, ax_w, ax_gw = _axis(cg, -1), _axis(cw, -1), _axis(cgw, 0)
        share_go = _tensorwise(cg) and cgw == cg
        # tensorwise: the forward's cast (same scale and recipe); rowwise: its own, once a step
        role = "forward" if w_scale is not None else "grad_input"
        w_cached = fp8.cached_cast(ctx.param, role) if back is None else \
            (back[0], _float8(back[1].t(), back[0], cw, mm, ax_w, weight.dtype))
        items = [(go, cg, ax_g, sh.grad_output)]
        items += [] if w_scale is not None or w_cached is not None else [(w_t, cw, ax_w, sh.weight_t)]
        items += [] if share_go else [(go, cgw, ax_gw, sh.grad_output)]
        scales = iter(_scales(items, spec.group, pow2))
        go8 = _cast(go, next(scales), cg, mm, GRAD_OUTPUT, ax_g)
        w_s = w_scale if w_scale is not None or w_cached is not None else next(scales)
        go8_gw = go8 if share_go else _cast(go, next(scales), cgw, mm, GRAD_OUTPUT, ax_gw)
        grad_x = None
        if ctx.needs_input_grad[0]:
            if w_cached is None:
                w_cached = (w_s, _cast(w_t, w_s, cw, mm, WEIGHT, ax_w))
                fp8.store_cast(ctx.param, role, w_cached)
            grad_x = torch.mm(go8, w_cached[1].t())
            grad_x = grad_x.reshape(*ctx.shape[:-1], grad_x.shape[-1])
        return grad_x, go8_gw

    @staticmethod
    def grad_weight(ctx, go8_gw: torch.Tensor, x_saved: torch.Tensor,
                    x_scale: torch.Tensor | None) -> torch.Tensor:
        """Backward's second half: the grad-weight gemm on the saved input [T, K] -- the
        forward's fp8 copy (``ctx.keep_fp8``: its data and scale), else the high-precision input,
        cast here with amaxes along T, which no TP shard splits (no collective)."""
        c, mm = ctx.spec.config, ctx.spec.mm
        ci = c.cast_config_input_for_grad_weight
        if ctx.keep_fp8:
            x8 = Float8TrainingTensor(x_saved, x_scale, ctx.dtype, mm, INPUT, None)
        else:
            ax_i = _axis(ci, 0)
            (s_i,) = _scales([(x_saved, ci, ax_i, ctx.spec.sharding.input)], ctx.spec.group,
                             c.round_scales_to_power_of_2)
            x8 = _cast(x_saved, s_i, ci, mm, INPUT, ax_i)
        return torch.mm(go8_gw.t(), x8)


class PendingGather(Protocol):
    """A launched all-gather, what :func:`sharded_input_forward`'s ``gather`` returns."""

    def wait(self) -> torch.Tensor: ...


def sharded_input_forward(ctxs: list, x: torch.Tensor, weights: list[torch.Tensor],
                          spec: Float8Matmul, gather: Callable[[torch.Tensor], PendingGather]
                          ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Forward of column-parallel linears that share an input of which this rank holds the
    sequence shard ``x`` [b, s/t, K] (SP; :func:`casts_input_once` recipes): the shard's amax is
    MAX-reduced over the TP group -- the amax of the whole input -- in one all-reduce with the
    amaxes of the weights not yet cast this step; the shard is cast with that scale and
    ``gather(fp8 shard)`` all-gathers the fp8 bytes ([b, s, K], 1 byte per element, half of
    bf16's) while the weights are cast; then one gemm per weight (``ctxs``: one autograd ctx per
    linear, as :meth:`_Float8TPMatmul.forward` fills). The cast is element-wise with one scale,
    so it commutes with the gather: bit-identical to casting the gathered input. Returns the
    outputs, this rank's fp8 shard [b, s/t, K] and its scale."""
    c = spec.config
    x2 = x.reshape(-1, x.shape[-1])
    # tensorwise: one scale for the whole input, whose rows (dim 0: the sequence) are sharded
    (s_in,), w_casts = _forward_scales([(x2, c.cast_config_input, None, 0)], weights, spec)
    shard8 = _cast(x2, s_in, c.cast_config_input, spec.mm, INPUT, None)._data.view(x.shape)
    pending = gather(shard8)
    w_casts = [_weight_cast(w, cast, spec) for w, cast in zip(weights, w_casts, strict=True)]
    full = pending.wait()
    x8 = Float8TrainingTensor(full.reshape(-1, full.shape[-1]), s_in, x.dtype, spec.mm, INPUT,
                              None)
    outs = [_Float8TPMatmul.gemm(ctx, x8, None, full.shape, x.dtype, w, cast, spec)
            for ctx, w, cast in zip(ctxs, weights, w_casts, strict=True)]
    return outs, shard8, s_in
