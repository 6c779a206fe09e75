"""The device that adapts: an exported :class:`~edgetrain.export.IntegerProgram` run on NVM weight codes.

``DeviceNet.from_program(program)`` builds the on-device network from the integer program alone
(codes, exponents, op graph; no float model, no fx graph). Its forward executes the program's ops
in torch on *values* ``code * 2^k`` held in float64, mirroring the integer executor op for op:

- every requantization is ``clip(round(v / 2^k), lo, hi) * 2^k`` with the quantizer's rounding
  (a shift of the integer code by the exponent difference, TQT appendix A);
- a conv / linear / scale op is ``q_out(act(q_acc(sum w x) + b))`` with ``w`` and ``b`` the current
  codes; the multiply-accumulate is exact in float64 for every partial sum below 2^53, the same bound
  under which the integer executor uses float64 BLAS, and runs on float32 kernels whenever its
  partial sums provably stay below 2^24 (``DeviceLayer.exact32``), or on the int8 codes themselves
  where the CPU multiplies int8 in hardware (``DeviceLayer.int8_product``; docs/device.md "Speed");

so the forward is the integer program bit for bit, at every step of adaptation, and
``to_program()`` exports the adapted device as a program whose outputs equal the device's forward.

Backward (LRT v1 section 5, appendix C): straight-through through every quantizer (the gradient is
masked where the code clipped, and by the ReLU); in online mode the gradient is quantized onto the
8-bit [-1, 1) grid at every weight layer's input and before every activation. Each weight layer
exposes, for the update rules, the last sample's im2col terms ``a`` (input patches) and
``dz = wmult * dL/dz`` with ``wmult = 2^(k_w + b - 1)``: the stored weight is ``W = code * 2^-(b-1)``
in [-1, 1) (the paper's weight unit) and the real weight is ``wmult * W``.

Batch norm: the TQT export folds every BN that follows a conv/linear into its weights and bias, so on
the device those BNs no longer exist: their statistics are frozen into the stored codes, and
adaptation moves the folded weights and biases directly. A BN that cannot be folded (after a
pool/ReLU, as in the LRT paper's net) is a ``scale`` op; with ``streaming_bn=True`` (the default,
as in the paper, App. E) the device keeps it as a streaming batch norm: per-channel EMAs
(eta = 1 - 1/B) of the mean and mean square of its input, 16-bit gamma and beta learned per sample,
and the op's codes ``w = q_w(gamma / sigma)``, ``b = q_b(beta - gamma mu / sigma)`` recomputed from
them at every forward; ``to_program()`` writes those codes. ``streaming_bn=False`` keeps the
exported codes fixed.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit
from torch import nn

from edgetrain.adapt.qnet import (
    PAPER_GRAD,
    ROUNDING_CODES,
    GradQuantMixin,
    Grid,
    LayerFormats,
    QuantChain,
    QuantStage,
    input_gradient,
    layer_gradient,
    nonzero_im2col,
    pair,
    round_code,
)
from edgetrain.export.program import IntegerProgram
from edgetrain.fixedpoint import RELU6_CEILING, FixedPointFormat, Rounding, round_tensor

WEIGHT_OPS = ("conv", "linear")
BN_WARM_STEPS = 10_000  # EMAs start at the exported statistics, as if after this many samples


class _Requantize(torch.autograd.Function):
    """``clip(round(v / 2^k), lo, hi) * 2^k``; straight-through inside [lo, hi] (and v > 0 after ReLU)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, v: torch.Tensor, quantizer: Requantizer
    ) -> torch.Tensor:
        out, mask = quantizer.forward_masked(v, keep_mask=v.requires_grad)
        if mask is not None:
            ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (mask,) = ctx.saved_tensors
        return grad * mask, None


@njit(cache=True)
def _requantize_masked(v, step, lo, hi, mode):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """(clip(round(v / step), lo, hi) step, code inside [lo, hi]) for one value; NaN stays NaN."""
    code = round_code(v / step, mode, 0.5)
    inside = (code >= lo) & (code <= hi)
    if code < lo:
        code = lo
    elif code > hi:
        code = hi
    return code * step, inside


@njit(cache=True)
def _requantize_values(v, step, lo, hi, mode, relu, keep_mask, out, mask):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """:func:`_requantize_masked` over flat float64 arrays, the mask (with ``keep_mask``) also requiring
    v > 0 after a ReLU: the torch ops of :meth:`Requantizer.forward_masked`."""
    for k in range(v.shape[0]):
        out[k], inside = _requantize_masked(v[k], step, lo, hi, mode)
        if keep_mask:
            mask[k] = inside & ((not relu) | (v[k] > 0))


class Requantizer:
    """One quantizer of the program as a value-domain function (bits, sign, exponent, rounding)."""

    def __init__(self, spec: dict[str, Any], activation: str = "none") -> None:
        self.fmt = FixedPointFormat(int(spec["bits"]), bool(spec["signed"]))
        self.exponent = int(spec["exponent"])
        self.step = math.ldexp(1.0, self.exponent)
        self.rounding = Rounding.parse(spec["rounding"]).value
        self.relu = activation in ("relu", "relu6")
        self.lo = max(self.fmt.qmin, 0) if self.relu else self.fmt.qmin
        self.hi = self.fmt.qmax
        if activation == "relu6":
            ceiling = round_tensor(torch.tensor(RELU6_CEILING / self.step, dtype=torch.float64), self.rounding)
            self.hi = int(min(max(float(ceiling), self.fmt.qmin), self.fmt.qmax))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return _Requantize.apply(v, self)

    def forward_masked(self, v: torch.Tensor, keep_mask: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(quantized v, straight-through mask: code inside [lo, hi], and v > 0 after a ReLU; None
        without ``keep_mask``), no autograd; one numba pass for a float64 CPU tensor."""
        if v.dtype == torch.float64 and v.device.type == "cpu":
            out = torch.empty(v.shape, dtype=torch.float64)
            mask = torch.empty(v.shape, dtype=torch.bool) if keep_mask else torch.empty(0, dtype=torch.bool)
            flat = v.detach().contiguous().numpy().reshape(-1)
            mode = ROUNDING_CODES[self.rounding]
            args = (self.step, float(self.lo), float(self.hi), mode, self.relu, keep_mask)
            _requantize_values(flat, *args, out.numpy().reshape(-1), mask.numpy().reshape(-1))
            return out, mask if keep_mask else None
        codes = round_tensor(v / self.step, self.rounding)
        mask = None
        if keep_mask:
            inside = (codes >= self.lo) & (codes <= self.hi)
            mask = inside & (v > 0) if self.relu else inside
        return codes.clamp_(self.lo, self.hi).mul_(self.step), mask

    def stage(self) -> QuantStage:
        """This quantizer as one stage of a fused :class:`~edgetrain.adapt.qnet.QuantChain`."""
        return QuantStage(self.step, self.lo, self.hi, self.rounding, self.relu)

    def codes(self, v: torch.Tensor) -> np.ndarray:
        """Integer codes of values already on this grid (exact)."""
        return torch.round(v.detach() / self.step).to(torch.int64).numpy()

    @property
    def grid(self) -> Grid:
        """The same grid as an ``edgetrain.adapt.Grid`` (for the rules' parameter updates)."""
        return Grid(self.fmt.bits, self.fmt.signed, self.exponent + self.fmt.mantissa_bits)


FLOAT32_EXACT_BOUND = 2**24  # every integer of magnitude <= 2^24 is a float32
INT8_MIN_WEIGHTS = 2**14  # smaller layers: the float32 product costs less than the int8 path's passes
INT8_MAX_PATCH_BYTES = 2**22  # larger im2col matrices (big evaluation batches): the float conv, no copy


def native_int8_matmul() -> bool:
    """Whether this CPU multiplies int8 matrices in hardware (AVX512-VNNI or AMX, through oneDNN): there
    ``torch._int_mm`` is ~10x faster than a float32 matrix product at batch 1 (scratch timing); without
    them its CPU kernel is slower than float32, and the device keeps the float32 product."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    native = any(probe is not None and probe() for probe in probes)
    return native and hasattr(torch, "_int_mm") and torch.backends.mkldnn.is_available()


INT8_MATMUL = native_int8_matmul()


@njit(cache=True)
def _input_codes_hwc(x, inverse, offset, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out[n, h, w, c] = x[n, c, h, w] / 2^k - offset as int8 (x: values on the 2^k grid, ``inverse``
    = 2^-k); returns False (out unusable) when a value is off the grid or its shifted code leaves int8."""
    bad = False
    for n in range(x.shape[0]):
        for h in range(x.shape[2]):
            for w in range(x.shape[3]):
                for c in range(x.shape[1]):
                    code = x[n, c, h, w] * inverse
                    shifted = code - offset
                    bad |= (code != np.rint(code)) | (shifted < -128) | (shifted > 127)
                    out[n, h, w, c] = np.int8(min(max(shifted, -128.0), 127.0))  # defined even when bad
    return not bad


@njit(cache=True)
def conv_output_size(size, kernel, stride, padding, dilation):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN201
    """Output length of a convolution along one axis (torch's formula, no ceil mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


@njit(cache=True)
def _im2col_hwc(x, kernel, stride, padding, dilation, fill, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """out[(n Ho + oy) Wo + ox, (ky kw + kx) C + c] = x[n, iy, ix, c] (N x H x W x C int8 codes),
    ``fill`` where the window leaves the image: the patches in (kernel row, kernel column, channel)
    order, the order of the layer's input-gradient weight layout."""
    batch, h, w, channels = x.shape
    kh, kw = kernel
    out_h = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    for n in range(batch):
        for oy in range(out_h):
            for ox in range(out_w):
                row = (n * out_h + oy) * out_w + ox
                for ky in range(kh):
                    iy = oy * stride[0] - padding[0] + ky * dilation[0]
                    for kx in range(kw):
                        ix = ox * stride[1] - padding[1] + kx * dilation[1]
                        base = (ky * kw + kx) * channels
                        inside = 0 <= iy < h and 0 <= ix < w
                        for c in range(channels):  # explicit: numba's slice copies cost ~50 ns each
                            out[row, base + c] = x[n, iy, ix, c] if inside else fill


@njit(cache=True)
def _scaled_accumulators(acc, correction, unit, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out[n, o, p] = (acc[o, n P + p] + correction[o]) unit: the int32 products (n_out x N P) back in
    the value domain, N x n_out x P (exact: integers below the dtype's 2^24 / 2^53 times a power of 2)."""
    pixels = out.shape[2]
    for n in range(out.shape[0]):
        for o in range(out.shape[1]):
            for p in range(pixels):
                out[n, o, p] = (acc[o, n * pixels + p] + correction[o]) * unit


def input_code_bounds(program: IntegerProgram) -> dict[str, tuple[int, int]]:
    """(largest |code|, exponent) of every tensor of the program: the output quantizer's range for ops
    that requantize, the inputs' for ops that pass codes through (maxpool, reshape, pad, concat...)."""
    bounds: dict[str, tuple[int, int]] = {}
    for op in program.ops:
        qname = op.get("out_q", op.get("quantizer"))
        if qname is not None:
            spec = program.quantizers[qname]
            fmt = FixedPointFormat(int(spec["bits"]), bool(spec["signed"]))
            bounds[op["output"]] = (max(-fmt.qmin, fmt.qmax), int(spec["exponent"]))
        else:
            sources = [bounds[name] for name in (op["inputs"] if "inputs" in op else [op["input"]])]
            bounds[op["output"]] = (max(b for b, _ in sources), min(k for _, k in sources))
    return bounds


class _LayerStep(torch.autograd.Function):
    """One weight layer ``q_out(act(q_acc(W x) + b))`` as a single autograd node with its backward
    written out (LRT v1 App. C), instead of one node per quantizer:

    g_y = m_out g (m_out: the output code did not clip, and y > 0 after a ReLU), quantized onto the
    gradient grid before the activation; dL/db = sum of g_y over pixels; dL/dz = m_acc g_y (m_acc: the
    accumulator did not clip), recorded as ``dz = wmult dL/dz`` for the update rules; dL/dx = W^T dL/dz
    (float32 kernels: the gradient is quantized to 8 bits right after, at the layer input).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, bias: torch.Tensor, layer: DeviceLayer
    ) -> torch.Tensor:
        out, masks = layer.compute(x, bias, keep_masks=True)
        ctx.layer, ctx.shape = layer, x.shape
        ctx.save_for_backward(*masks)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        layer: DeviceLayer = ctx.layer
        out_mask, acc_mask = ctx.saved_tensors
        grid = layer.formats.grad if layer.out_q.relu and layer.quantize_grads else None
        bias_g, g, dz, nonzero = layer_gradient(grad, grid, acc_mask, out_mask, wmult=layer.wmult)
        grad_bias = bias_g.sum([d for d in range(g.dim()) if d != 1]) if ctx.needs_input_grad[1] else None
        if layer.record:
            layer.cache_dz = dz
        if not ctx.needs_input_grad[0]:
            return None, grad_bias, None
        if not nonzero:  # all-zero after gradient quantization: no kernel, nothing to quantize
            return g.new_zeros(ctx.shape), grad_bias, None
        units = (layer.formats.grad.lsb, math.ldexp(1.0, layer.k_w))  # dz and W: codes times these
        dx = input_gradient(ctx.shape, layer.weight32(), g.float(), layer, units)
        return layer.quantize_grad(dx.double()), grad_bias, None


def _values(codes: np.ndarray, exponent: int) -> torch.Tensor:
    return torch.from_numpy(np.ldexp(codes.astype(np.float64), exponent))


class _TableLookup(torch.autograd.Function):
    """``T[code - n]`` in the value domain; backward: the table's own slope at that code (central
    differences of its values), i.e. straight-through on the piecewise-linear table."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, v: torch.Tensor, table: LookupTable
    ) -> torch.Tensor:
        index = table.index(v)
        ctx.save_for_backward(index)
        ctx.table = table
        return table.gather(table.values, index)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        return grad * ctx.table.gather(ctx.table.slopes, index).to(grad.dtype), None


class LookupTable:
    """A ``lookup`` op (element-wise function on the input's codes): ``T[code - n_in]`` as values
    ``code_out * 2^k_out``, one row per channel for a 2-D table, as ``IntegerProgram`` executes it."""

    def __init__(self, op: dict[str, Any], program: IntegerProgram) -> None:
        spec = program.quantizers[op["in_q"]]
        self.step = math.ldexp(1.0, int(spec["exponent"]))
        self.qmin = FixedPointFormat(int(spec["bits"]), bool(spec["signed"])).qmin
        codes = program.tensors[op["table"]]
        self.values = _values(codes, int(program.quantizers[op["out_q"]]["exponent"])).reshape(-1, codes.shape[-1])
        (self.slopes,) = torch.gradient(self.values, spacing=self.step, dim=1)

    def index(self, v: torch.Tensor) -> torch.Tensor:
        return (torch.round(v.detach() / self.step).long() - self.qmin).clamp_(0, self.values.shape[1] - 1)

    def gather(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if len(rows) == 1:
            return rows[0][index]
        channel = torch.arange(len(rows)).reshape(1, -1, *([1] * (index.dim() - 2)))
        return rows[channel, index]

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return _TableLookup.apply(v, self)


@njit(cache=True)
def _load_codes(codes, unit, weight, weight32, row_l1):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """weight = codes unit (float64), weight32 = the same in float32 (exact: 8-bit codes times a power
    of 2), row_l1 = each row's sum of |codes| (the :attr:`DeviceLayer.exact32` bound's factor)."""
    for o in range(codes.shape[0]):
        row = 0
        for j in range(codes.shape[1]):
            c = codes[o, j]
            weight[o, j] = c * unit
            weight32[o, j] = c * unit
            row += abs(c)
        row_l1[o] = row


@njit(cache=True)
def _load_cells(codes, cells, unit, weight, weight32, row_l1, kernel, laid, codes8, row_sum):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """:func:`_load_codes` for the flat ``cells`` of the n_out x n_in matrices only, row_l1 updated by
    |new| - |old| per cell; ``laid`` (n_out x kh x kw x n_in / (kh kw), ``kernel`` = (kh, kw), or
    empty) is the ``input_gradient`` layout of weight32 and ``codes8`` (the same layout as int8 codes,
    or empty) the int8 product's, with its row sums ``row_sum``, all updated in place."""
    n_in = codes.shape[1]
    taps = kernel[0] * kernel[1]
    for cell in cells:
        o, j = cell // n_in, cell % n_in
        c = codes[o, j]
        old = np.int64(np.rint(weight[o, j] / unit))
        row_l1[o] += abs(c) - abs(old)
        weight[o, j] = c * unit
        weight32[o, j] = c * unit
        k = j % taps
        position = (k // kernel[1], k % kernel[1], j // taps)
        if laid.size:
            laid[o, position[0], position[1], position[2]] = weight32[o, j]
        if codes8.size:
            codes8[o, position[0], position[1], position[2]] = c
            row_sum[o] += c - old


class DeviceLayer(GradQuantMixin):
    """A conv or linear op whose weights live in NVM: ``q_out(act(q_acc(W x) + b))``.

    ``weight`` holds the real weight values ``code * 2^k_w`` (float64, shaped like torch's weight);
    the matrix view is ``n_out x n_in`` with ``n_in = c_in/groups * kh * kw`` in ``unfold`` order.

    The multiply-accumulate ``W x`` runs in float32 whenever that is exact: every partial sum of an
    output is an integer multiple of 2^(k_w + k_x) no larger than ``max_o sum_j |w_oj| * max|x|``
    (in those units), so when that bound is <= 2^24 float32 holds every partial sum exactly, in any
    summation order. The bound is recomputed whenever the codes change; above it the product runs in
    float64 (exact to 2^53, as the integer executor).
    """

    def __init__(self, op: dict[str, Any], program: IntegerProgram, grad: Grid, input_bound: tuple[int, int]) -> None:
        super().__init__()
        self.op = op
        self.name = str(op["weight"]).removesuffix(".weight")
        self.is_conv = op["op"] == "conv"
        q = program.quantizers
        w_spec = q[op["weight_q"]]
        self.k_w = int(w_spec["exponent"])
        weight_fmt = FixedPointFormat(int(w_spec["bits"]), True)
        self.wmult = math.ldexp(1.0, self.k_w + weight_fmt.mantissa_bits)
        self.acc_q = Requantizer(q[op["acc_q"]])
        self.bias_q = Requantizer(q[op["bias_q"]])
        self.out_q = Requantizer(q[op["out_q"]], op["activation"])
        self.formats = LayerFormats(
            weight=Grid(weight_fmt.bits, True, 0),
            bias=self.bias_q.grid,
            acc=self.acc_q.grid,
            act=self.out_q.grid,
            grad=grad,
            wmult_log2=self.k_w + weight_fmt.mantissa_bits,
        )
        self.input_code_max, self.input_exponent = input_bound
        self.float32_units = self.k_w + self.input_exponent >= -100  # 2^(k_w + k_x) far above float32 underflow
        # acc + b in units of the finer exponent: |acc| 2^(k_acc - m) + |b| 2^(k_b - m) <= 2^24 keeps it exact
        finest = min(self.acc_q.exponent, self.bias_q.exponent)
        largest = sum(max(-q.fmt.qmin, q.fmt.qmax) * 2 ** (q.exponent - finest) for q in (self.acc_q, self.bias_q))
        self.bias_sum_fits32 = largest <= FLOAT32_EXACT_BOUND
        self.chain = QuantChain([self.acc_q.stage(), self.out_q.stage()])
        codes = program.tensors[op["weight"]]
        self.weight_shape = tuple(codes.shape)
        self.register_buffer("weight", _values(codes, self.k_w))
        self.bias = nn.Parameter(_values(program.tensors[op["bias"]], self.bias_q.exponent))
        if self.is_conv:
            self.stride, self.padding = pair(op["stride"]), pair(op["padding"])
            self.dilation, self.groups = pair(op["dilation"]), int(op["groups"])
        else:
            self.groups = 1
        self.record = False
        self._weight32: torch.Tensor | None = None
        self._exact32: bool | None = None
        self._row_l1: np.ndarray | None = None  # per row sum of |codes| (set_codes keeps it)
        self._input_grad_cache: tuple[torch.Tensor, np.ndarray] | None = None
        n_out, n_in = self.shape2d
        self.int8_products = (  # 8-bit weights and inputs (int8, or uint8 shifted): int8_product
            INT8_MATMUL
            and self.groups == 1
            and weight_fmt.bits <= 8
            and self.input_code_max <= 255
            and n_out * n_in >= INT8_MIN_WEIGHTS
        )
        self._codes8: tuple[torch.Tensor, np.ndarray] | None = None  # (int8 codes, row sums) for int8_product
        self.cache_input: torch.Tensor | None = None
        self.cache_dz: torch.Tensor | None = None
        self.out_pixels = 1

    @property
    def shape2d(self) -> tuple[int, int]:
        """(n_out, n_in) of the weight matrix."""
        return self.weight_shape[0], int(np.prod(self.weight_shape[1:]))

    @property
    def kernel_size(self) -> tuple[int, int]:
        return self.weight_shape[2], self.weight_shape[3]

    def product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """sum w x: the convolution or the matrix product (no bias)."""
        if self.is_conv:
            return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)
        return F.linear(x, weight)

    @property
    def exact32(self) -> bool:
        """Whether the float32 product is exact for the current codes (class docstring)."""
        if self._exact32 is None:
            row_sums = self.weight.abs().reshape(self.weight_shape[0], -1).sum(1)
            bound = float(row_sums.max()) * math.ldexp(1.0, -self.k_w) * self.input_code_max
            self._exact32 = self.float32_units and bound <= FLOAT32_EXACT_BOUND
        return self._exact32

    def int8_product(self, x: torch.Tensor) -> torch.Tensor | None:
        """sum w x from the int8 codes (``torch._int_mm``, int32 accumulators: exact), in float32 when
        :attr:`exact32` else float64, the same values as the float products; None where the input is
        not 8-bit codes on its grid, or where a conv's patches would exceed ``INT8_MAX_PATCH_BYTES`` (a
        large evaluation batch). Unsigned codes c in [0, 255] enter as c - 128 with 128 sum_j w_oj added
        back (a padded tap is code 0: it enters as -128 and cancels its share of the sum)."""
        if self._codes8 is None:  # the input-gradient layout (n_out x kh x kw x c_in), as int8 codes
            codes = self.codes()
            laid = codes.reshape(self.weight_shape).transpose(0, 2, 3, 1) if self.is_conv else codes[:, None, None]
            self._codes8 = (torch.from_numpy(np.ascontiguousarray(laid, np.int8)), codes.sum(1))
        codes8, row_sum = self._codes8
        image = x.detach().reshape(x.shape[0], -1, 1, 1) if not self.is_conv else x.detach()
        batch, channels, height, width = image.shape
        if self.is_conv:
            kh, kw = self.kernel_size
            out_h = conv_output_size(height, kh, self.stride[0], self.padding[0], self.dilation[0])
            out_w = conv_output_size(width, kw, self.stride[1], self.padding[1], self.dilation[1])
            if batch * out_h * out_w * kh * kw * channels > INT8_MAX_PATCH_BYTES:
                return None
        hwc = np.empty((batch, height, width, channels), np.int8)
        offset = 128 if self.input_code_max > 128 else 0  # an unsigned 8-bit input: [0, 255] -> int8
        if not _input_codes_hwc(image.contiguous().numpy(), math.ldexp(1.0, -self.input_exponent), offset, hwc):
            return None
        if self.is_conv:
            patches = np.empty((batch * out_h * out_w, kh * kw * channels), np.int8)
            _im2col_hwc(hwc, (kh, kw), self.stride, self.padding, self.dilation, np.int8(-offset), patches)
            shape = (batch, codes8.shape[0], out_h, out_w)
        else:
            patches, shape = hwc.reshape(batch, channels), (batch, codes8.shape[0])
        acc = torch._int_mm(codes8.view(codes8.shape[0], -1), torch.from_numpy(patches).T)  # n_out x N P
        out = torch.empty(shape, dtype=torch.float32 if self.exact32 else torch.float64)
        unit = math.ldexp(1.0, self.k_w + self.input_exponent)
        _scaled_accumulators(acc.numpy(), offset * row_sum, unit, out.numpy().reshape(batch, shape[1], -1))
        return out

    def exact_product(self, x: torch.Tensor) -> torch.Tensor:
        """sum w x exactly: from the int8 codes where the CPU multiplies int8 natively
        (:meth:`int8_product`), else float32 values from float32 kernels when :attr:`exact32`, else
        float64."""
        if self.int8_products:
            z = self.int8_product(x)
            if z is not None:
                return z
        if self.exact32:
            with torch.backends.nnpack.flags(enabled=False):  # no Winograd / FFT: direct sums only
                return self.product(x.float(), self.weight32())
        return self.product(x, self.weight)

    def compute(
        self, x: torch.Tensor, bias: torch.Tensor, keep_masks: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """(q_out(act(q_acc(W x) + b)), masks): the masks (output did not clip and, after a ReLU, y > 0;
        accumulator did not clip) only with ``keep_masks``. The requantization stays in float32 after a
        float32 product when ``acc + b`` fits 24 bits (:attr:`bias_sum_fits32`), else goes to float64."""
        z = self.exact_product(x)
        if z.dtype == torch.float32 and not self.bias_sum_fits32:
            z = z.double()
        out, (acc_mask, out_mask) = self.chain(z, bias, np.float64)
        return out, (out_mask, acc_mask) if keep_masks else ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.cache_dz = None
        if self.record:
            self.cache_input = x.detach()
        if torch.is_grad_enabled() and (x.requires_grad or self.bias.requires_grad):
            out = _LayerStep.apply(x, self.bias, self)
        else:
            out = self.compute(x, self.bias)[0]
        if self.is_conv:
            self.out_pixels = int(out.shape[-2] * out.shape[-1])
        return out

    def _recorded(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cache_input is None or self.cache_dz is None:
            raise RuntimeError(f"layer {self.name}: no forward/backward pass has been recorded")
        return self.cache_input, self.cache_dz

    def columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last sample's im2col terms (LRT App. B): ``a`` (pixels x n_in), ``dz`` (pixels x n_out)."""
        x, dz = self._recorded()
        if self.groups != 1:
            raise ValueError(
                f"layer {self.name}: a grouped conv has no single im2col Kronecker term; use weight_grad()"
            )
        if not self.is_conv:
            return x.flatten(1), dz
        a = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        return a[0].T, dz[0].flatten(1).T

    def nonzero_columns(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of :meth:`columns` whose ``dz`` is non-zero, in float32 (exact: 8-bit codes times
        powers of 2), patches taken only at those pixels: the terms that add to a Kronecker sum."""
        x, dz = self._recorded()
        if self.groups != 1:
            raise ValueError(
                f"layer {self.name}: a grouped conv has no single im2col Kronecker term; use weight_grad()"
            )
        if not self.is_conv:
            return nonzero_im2col(x, dz, (1, 1), (1, 1), (0, 0), (1, 1), is_conv=False)
        return nonzero_im2col(x, dz, self.kernel_size, self.stride, self.padding, self.dilation, is_conv=True)

    def weight_grad(self) -> torch.Tensor:
        """dL/dW in stored units (n_out x n_in): the sum over pixels of dz a^T, any groups."""
        x, dz = self._recorded()
        if not self.is_conv:
            return dz.T @ x.flatten(1)
        grad = torch.nn.grad.conv2d_weight(
            x, self.weight_shape, dz, self.stride, self.padding, self.dilation, self.groups
        )
        return grad.reshape(self.shape2d)

    def set_codes(self, codes: np.ndarray, cells: np.ndarray | None = None) -> None:
        """Load stored codes (n_out x n_in) into the weight values (exact: codes times 2^k_w), their
        float32 copy and the :attr:`exact32` bound, in one pass; with ``cells`` (flat indices of the
        only cells that changed since the last load, e.g. ``NVMArray.drifted_cells``) only those."""
        codes2d = np.ascontiguousarray(codes).reshape(self.shape2d)
        weight = self.weight.detach().view(self.shape2d).numpy()
        unit = math.ldexp(1.0, self.k_w)
        if cells is not None and self._row_l1 is not None and self._weight32 is not None:
            cache = self._input_grad_cache
            laid = cache[1] if cache is not None and cache[0] is self._weight32 else np.zeros((0, 1, 1, 0), np.float32)
            codes8, row_sum = (
                (self._codes8[0].numpy(), self._codes8[1])
                if self._codes8 is not None
                else (np.zeros((0, 1, 1, 0), np.int8), np.zeros(0, np.int64))
            )
            weight32 = self._weight32.view(self.shape2d).numpy()
            kernel = self.kernel_size if self.is_conv else (1, 1)
            _load_cells(codes2d, cells, unit, weight, weight32, self._row_l1, kernel, laid, codes8, row_sum)
        else:
            self._codes8 = None
            if self._weight32 is None or self._weight32.shape != self.weight.shape:
                self._weight32 = torch.empty(self.weight_shape, dtype=torch.float32)
            self._row_l1 = np.empty(self.shape2d[0], np.int64)
            _load_codes(codes2d, unit, weight, self._weight32.view(self.shape2d).numpy(), self._row_l1)
            self._input_grad_cache = None  # input_gradient's laid-out weights are stale
        self._exact32 = self.float32_units and int(self._row_l1.max()) * self.input_code_max <= FLOAT32_EXACT_BOUND

    def weight32(self) -> torch.Tensor:
        """The weights in float32 (exact: 8-bit codes times 2^k_w), cached until the codes change."""
        if self._weight32 is None or self._weight32.shape != self.weight.shape:
            self._weight32 = self.weight.float()
        return self._weight32

    def codes(self) -> np.ndarray:
        """Current stored codes as an (n_out x n_in) int64 matrix."""
        return np.rint(np.ldexp(self.weight.numpy(), -self.k_w)).astype(np.int64).reshape(self.shape2d)

    def export_tensors(self) -> dict[str, np.ndarray]:
        return {
            self.op["weight"]: self.codes().reshape(self.weight_shape),
            self.op["bias"]: self.bias_q.codes(self.bias),
        }


class DeviceBatchNorm(GradQuantMixin):
    """A ``scale`` op (a BN that could not be folded) kept as streaming batch norm (LRT v1 App. E).

    Per channel: ``mu = m / (1 - eta^t)``, ``var = sq / (1 - eta^t) - mu^2`` from the EMAs of the
    input's mean ``m`` and mean square ``sq`` (eta = 1 - 1/B, updated in training mode only); the op's
    codes are ``w = q_w(gamma / sigma)`` and ``b = q_b(beta - gamma mu / sigma)``; gamma and beta are
    16-bit parameters learned per sample; no gradient flows through the statistics. With
    ``enabled=False`` the exported codes stay fixed.
    """

    def __init__(self, op: dict[str, Any], program: IntegerProgram, grad: Grid, streaming: bool, batch: int) -> None:
        super().__init__()
        self.op = op
        self.name = str(op["weight"]).removesuffix(".weight")
        q = program.quantizers
        self.weight_q = Requantizer(q[op["weight_q"]])
        self.acc_q = Requantizer(q[op["acc_q"]])
        self.bias_q = Requantizer(q[op["bias_q"]])
        self.out_q = Requantizer(q[op["out_q"]], op["activation"])
        self.register_buffer("weight", _values(program.tensors[op["weight"]], self.weight_q.exponent))
        self.register_buffer("bias", _values(program.tensors[op["bias"]], self.bias_q.exponent))
        bn = op.get("bn")
        self.enabled = bool(streaming and bn)
        self.eta = 1.0 - 1.0 / batch
        stats = bn or {"mean": [0.0], "var": [1.0], "eps": 1e-5, "gamma": [1.0], "beta": [0.0]}
        mean = torch.tensor(stats["mean"], dtype=torch.float64)
        gamma = torch.tensor(stats["gamma"], dtype=torch.float64)
        beta = torch.tensor(stats["beta"], dtype=torch.float64)
        self.eps = float(stats["eps"])
        span = float(torch.cat([gamma.abs(), beta.abs()]).max())
        self.param_grid = Grid(16, True, max(3, math.ceil(math.log2(span + 1e-12)) + 1))
        self.formats = LayerFormats(bias=self.param_grid, grad=grad)
        self.gamma = nn.Parameter(self.param_grid.quantize(gamma))
        self.beta = nn.Parameter(self.param_grid.quantize(beta))
        var = torch.tensor(stats["var"], dtype=torch.float64)
        self.register_buffer("mean_ema", mean.clone())
        self.register_buffer("msq_ema", var + mean * mean)
        self.register_buffer("step", torch.tensor(BN_WARM_STEPS, dtype=torch.int64))
        self.register_buffer("refolded", torch.tensor(False))  # False: still the exported codes

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bias-corrected (mu, sigma) of the EMAs."""
        correction = 1.0 - self.eta ** max(int(self.step), 1)
        mu = self.mean_ema / correction
        var = (self.msq_ema / correction - mu * mu).clamp(1e-8, 1e8)
        return mu, torch.sqrt(var + self.eps)

    @torch.no_grad()
    def observe(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        self.mean_ema.mul_(self.eta).add_((1 - self.eta) * x.mean(dims))
        self.msq_ema.mul_(self.eta).add_((1 - self.eta) * (x * x).mean(dims))
        self.step += 1
        self.refolded.fill_(True)

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) on the op's grids: the exported codes until the first streaming sample, then the
        streaming BN's current fold (so a freshly loaded program runs exactly as exported)."""
        if not self.enabled or not bool(self.refolded):
            return self.weight, self.bias
        mu, sigma = self.statistics()
        return self.weight_q(self.gamma / sigma), self.bias_q(self.beta - self.gamma * mu / sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.training:
            self.observe(x.detach())
        w, b = self.folded()
        x = self.gq(x, self.formats.grad)
        shape = (1, -1, *([1] * (x.dim() - 2)))
        y = self.acc_q(x * w.view(shape)) + b.view(shape)
        if self.out_q.relu:
            y = self.gq(y, self.formats.grad)
        return self.out_q(y)

    def export_tensors(self) -> dict[str, np.ndarray]:
        w, b = self.folded()
        return {self.op["weight"]: self.weight_q.codes(w), self.op["bias"]: self.bias_q.codes(b)}

    def export_op(self) -> dict[str, Any]:
        """The op with the current statistics and parameters in its ``bn`` record."""
        op = copy.deepcopy(self.op)
        if self.enabled:
            mu, sigma = self.statistics()
            op["bn"] = {
                "mean": mu.tolist(),
                "var": (sigma * sigma - self.eps).tolist(),
                "eps": self.eps,
                "gamma": self.gamma.detach().tolist(),
                "beta": self.beta.detach().tolist(),
            }
        return op


class DeviceNet(nn.Module):
    """The integer program as a trainable on-device network (see the module docstring).

    ``weight_layers`` (conv/linear ops, weights in NVM) and ``bn_layers`` (streaming batch norms) are
    what the update rules of :mod:`edgetrain.adapt.rules` act on; ``forward(x)`` takes float images
    (N x C x H x W) and returns the program's output values (float32, exact).
    """

    def __init__(
        self, program: IntegerProgram, grad: Grid = PAPER_GRAD, streaming_bn: bool = True, bn_batch: int = 10
    ) -> None:
        super().__init__()
        program.validate()
        self.program = program
        self.input_shape = list(program.input_shape)
        self.stages = nn.ModuleDict()
        bounds = input_code_bounds(program)
        for op in program.ops:
            if op["op"] in WEIGHT_OPS:
                self.stages[op["output"]] = DeviceLayer(op, program, grad, bounds[op["input"]])
            elif op["op"] == "scale":
                self.stages[op["output"]] = DeviceBatchNorm(op, program, grad, streaming_bn, bn_batch)
        self.requantizers: dict[str, Requantizer] = {}
        for op in program.ops:
            if op["op"] in ("quantize", "requantize"):
                self.requantizers[op["output"]] = Requantizer(
                    program.quantizers[op["quantizer"]], op.get("activation", "none")
                )
            elif op["op"] in ("add", "sub", "mul", "mean", "lookup", "avgpool"):
                self.requantizers[op["output"]] = Requantizer(
                    program.quantizers[op["out_q"]], op.get("activation", "none")
                )
            elif op["op"] == "leaky_relu":
                self.requantizers[op["output"] + "/product"] = Requantizer(program.quantizers[op["prod_q"]])
                self.requantizers[op["output"]] = Requantizer(program.quantizers[op["out_q"]])
        self.tables = {op["output"]: LookupTable(op, program) for op in program.ops if op["op"] == "lookup"}
        self.constants: dict[str, torch.Tensor] = {}
        for op in program.ops:
            for field, qfield in (("reciprocal", "recip_q"), ("alpha", "alpha_q")):
                if field in op:
                    exponent = int(program.quantizers[op[qfield]]["exponent"])
                    self.constants[op["output"]] = _values(program.tensors[op[field]], exponent)

    @classmethod
    def from_program(
        cls, program: IntegerProgram, grad: Grid = PAPER_GRAD, streaming_bn: bool = True, bn_batch: int = 10
    ) -> DeviceNet:
        """The device network of an exported program (``IntegerProgram.load(dir)`` or ``to_integer``)."""
        return cls(program, grad=grad, streaming_bn=streaming_bn, bn_batch=bn_batch)

    @property
    def weight_layers(self) -> list[DeviceLayer]:
        return [s for s in self.stages.values() if isinstance(s, DeviceLayer)]

    @property
    def bn_layers(self) -> list[DeviceBatchNorm]:
        return [s for s in self.stages.values() if isinstance(s, DeviceBatchNorm) and s.enabled]

    def set_online(self, online: bool) -> None:
        """Online (batch 1) mode quantizes gradients; offline use does not."""
        for stage in self.stages.values():
            stage.quantize_grads = online

    def set_streaming_bn(self, enabled: bool) -> None:
        """Streaming BN on the ``scale`` ops that carry BN statistics (off: their exported codes)."""
        for stage in self.stages.values():
            if isinstance(stage, DeviceBatchNorm):
                stage.enabled = enabled and "bn" in stage.op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if list(x.shape[1:]) != self.input_shape[1:]:
            raise ValueError(f"input shape {list(x.shape)} does not match the program's {self.input_shape}")
        if torch.isnan(x).any():
            raise ValueError("input contains NaN; the device cannot quantize it (clean the data first)")
        env: dict[str, torch.Tensor] = {}
        for op in self.program.ops:
            env[op["output"]] = self._execute(op, x, env)
        return env[self.program.output].float()

    def _execute(self, op: dict[str, Any], x: torch.Tensor, env: dict[str, torch.Tensor]) -> torch.Tensor:
        kind, out = op["op"], op["output"]
        if kind == "quantize":
            return self.requantizers[out](x.double())
        if kind in ("add", "sub", "mul", "concat"):
            inputs = [env[name] for name in op["inputs"]]
            if kind == "concat":
                return torch.cat(inputs, dim=int(op["axis"]))
            if kind == "mul":  # exact in float64: a product of two codes times 2^(k_a + k_b)
                return self.requantizers[out](inputs[0] * inputs[1])
            return self.requantizers[out](inputs[0] + inputs[1] if kind == "add" else inputs[0] - inputs[1])
        v = env[op["input"]]
        if out in self.stages:
            return self.stages[out](v)
        if kind == "requantize":
            return self.requantizers[out](v)
        if kind == "reshape":
            return v.reshape(op["shape"])
        if kind == "maxpool":
            return F.max_pool2d(
                v, op["kernel"], op["stride"], op["padding"], op["dilation"], ceil_mode=op.get("ceil_mode", False)
            )
        if kind == "mean":
            return self.requantizers[out](v.sum(op["axes"], keepdim=bool(op["keepdim"])) * self.constants[out])
        if kind == "lookup":
            return self.tables[out](v)
        if kind == "pad":  # ONNX order (begins, then ends) to torch's (last axis first)
            half = len(op["pads"]) // 2
            pads = [p for d in reversed(range(half)) for p in (op["pads"][d], op["pads"][half + d])]
            return F.pad(v, pads)
        if kind == "upsample":
            return v.repeat_interleave(op["scale"][0], dim=2).repeat_interleave(op["scale"][1], dim=3)
        if kind == "transpose":
            return v.permute(*op["perm"])
        if kind == "slice":
            return v.narrow(int(op["axis"]), int(op["start"]), int(op["length"]))
        if kind == "avgpool":
            window_sum = F.avg_pool2d(v, op["kernel"], op["stride"], op["padding"], divisor_override=1)
            return self.requantizers[out](window_sum * self.constants[out])
        if kind == "leaky_relu":
            product = self.requantizers[out + "/product"](v * self.constants[out])
            return self.requantizers[out](torch.maximum(v, product))
        raise ValueError(f"op {kind!r} ({out}) has no device implementation")

    def to_program(self) -> IntegerProgram:
        """The adapted device as an integer program (same manifest format; current NVM codes)."""
        tensors = {name: codes.copy() for name, codes in self.program.tensors.items()}
        ops = []
        for op in self.program.ops:
            stage = self.stages[op["output"]] if op["output"] in self.stages else None
            if stage is None:
                ops.append(copy.deepcopy(op))
                continue
            tensors.update(stage.export_tensors())
            ops.append(stage.export_op() if isinstance(stage, DeviceBatchNorm) else copy.deepcopy(op))
        program = IntegerProgram(
            quantizers=copy.deepcopy(self.program.quantizers),
            ops=ops,
            tensors=tensors,
            input=self.program.input,
            output=self.program.output,
            input_shape=list(self.program.input_shape),
            shapes=copy.deepcopy(self.program.shapes),
            meta=copy.deepcopy(self.program.meta),
        )
        program.validate()
        return program
