"""The online step of a :class:`~edgetrain.adapt.DeviceNet` without autograd (batch 1).

A device learns one sample at a time, so the per-sample costs of building and walking an autograd
graph (one node per quantizer, Python ``Function.apply`` calls, the engine) weigh as much as the
arithmetic. :class:`DeviceStep` runs the program's ops forward, keeps what each op's backward needs
(requantizer masks, max-pool indices, the layer inputs) and runs the backward written out op by op,
in reverse program order:

- requantizer ``clip(round(v / 2^k), lo, hi) 2^k``: straight-through, ``g m`` (m: the code did not
  clip, and v > 0 after a ReLU);
- conv / linear: the layer's own backward (``edgetrain.adapt.qnet.layer_gradient``, bias gradient,
  ``dz`` recorded for the update rules, ``W^T dL/dz`` quantized onto the gradient grid, LRT v1 App. C);
- streaming BN (``scale`` op): ``y = q_out(q_acc(x w) + b)`` with ``w = q_w(gamma / sigma)``,
  ``b = q_b(beta - gamma mu / sigma)``: dL/dx = q_g(g_acc w), dL/dgamma = (sum g_acc x) m_w / sigma
  - (sum g_y) m_b / sigma mu, dL/dbeta = (sum g_y) m_b;
- max-pool: the gradient goes to the window's arg-max (torch's index); avg-pool (window sums times
  the reciprocal code): torch's ``avg_pool2d_backward``; add: both inputs; reshape: reshaped back.

Every step performs the same floating-point operations, in the same order, as the autograd path
(``DeviceNet.forward`` then ``Tensor.backward``): the same torch ops, or numba passes that fuse a run
of them (streaming BN's EMA / fold, max-pool, gradient quantization), tested equal to them. So the two
give identical values bit for bit:
logits, ``dz``, bias / gamma / beta gradients, and hence codes, writes and BN state
(tests/test_device_step.py compares whole trajectories). The autograd path stays the reference,
and the trainer falls back to it (``OnlineTrainer(..., executor=False)``, or a program with an op
outside :data:`STEP_OPS`: concat, sub, mul, mean, lookup, pad, upsample, transpose, slice, leaky ReLU).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit

from edgetrain.adapt.device import DeviceBatchNorm, DeviceLayer, DeviceNet, _requantize_masked
from edgetrain.adapt.qnet import (
    ROUNDING_CODES,
    QuantChain,
    _on_grid,
    grid_round,
    input_gradient,
    layer_gradient,
    pair,
)

STEP_OPS = frozenset({"quantize", "conv", "linear", "scale", "requantize", "maxpool", "avgpool", "add", "reshape"})


def unsupported_ops(net: DeviceNet) -> list[str]:
    """The program's op kinds that :class:`DeviceStep` does not run (empty: it runs them all)."""
    return sorted({op["op"] for op in net.program.ops} - STEP_OPS)


@njit(cache=True)
def _bn_fold(mean_ema, msq_ema, mean, msq, observe, eta, rest, correction, eps, gamma, beta, quantizers, folded, masks):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """Per channel: EMAs m = m eta + (1 - eta) mean, sq likewise (when ``observe``); mu = m / c,
    var = clip(sq / c - mu^2, 1e-8, 1e8), sigma = sqrt(var + eps); w = q_w(gamma / sigma),
    b = q_b(beta - gamma mu / sigma) with their masks: ``DeviceBatchNorm.observe`` / ``statistics`` /
    ``folded`` element for element (c = 1 - eta^step)."""
    for ch in range(mean_ema.shape[0]):
        if observe:
            mean_ema[ch] = mean_ema[ch] * eta + rest * mean[ch]
            msq_ema[ch] = msq_ema[ch] * eta + rest * msq[ch]
        mu = mean_ema[ch] / correction
        var = msq_ema[ch] / correction - mu * mu
        if var < 1e-8:
            var = 1e-8
        elif var > 1e8:
            var = 1e8
        sigma = np.sqrt(var + eps)
        w_step, w_lo, w_hi, w_mode = quantizers[0]
        b_step, b_lo, b_hi, b_mode = quantizers[1]
        folded[0, ch], masks[0, ch] = _requantize_masked(gamma[ch] / sigma, w_step, w_lo, w_hi, w_mode)
        folded[1, ch], masks[1, ch] = _requantize_masked(beta[ch] - gamma[ch] * mu / sigma, b_step, b_lo, b_hi, b_mode)
        folded[2, ch], folded[3, ch] = mu, sigma


@njit(cache=True)
def _bn_backward_pass(g, out_mask, acc_mask, w, x, relu, quantize, lsb, lo, hi, g_y, g_acc_x, dx):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202, PLR0913
    """Streaming BN's element-wise backward (N x C x P, w per channel) in one pass: g_y = q(g m_out)
    (q onto the gradient grid after a ReLU, when ``quantize``), g_acc = g_y m_acc, g_acc_x = g_acc x,
    dx = q(g_acc w); the same float64 operations as the torch expressions (a mask multiplies by 1 or
    0, so -0 stays -0), in the same order."""
    inverse = 1.0 / lsb
    for n in range(g.shape[0]):
        for c in range(g.shape[1]):
            for p in range(g.shape[2]):
                v = g[n, c, p] * (1.0 if out_mask[n, c, p] else 0.0)
                if relu and quantize:
                    v = _on_grid(v, lsb, inverse, lo, hi)
                g_y[n, c, p] = v
                acc = v * (1.0 if acc_mask[n, c, p] else 0.0)
                g_acc_x[n, c, p] = acc * x[n, c, p]
                d = acc * w[c]
                if quantize:
                    d = _on_grid(d, lsb, inverse, lo, hi)
                dx[n, c, p] = d


@njit(cache=True)
def _max_pool(x, kernel, stride, out, index):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out = the max of each window of x (C x H x W), index = the flat position y W + x of its first
    maximum in row-major order (NaN wins): torch's CPU max-pool kernel, without padding or dilation."""
    width = x.shape[2]
    for c in range(out.shape[0]):
        for oy in range(out.shape[1]):
            for ox in range(out.shape[2]):
                y0, x0 = oy * stride[0], ox * stride[1]
                best, arg = -np.inf, y0 * width + x0
                for y in range(y0, y0 + kernel[0]):
                    for xx in range(x0, x0 + kernel[1]):
                        v = x[c, y, xx]
                        if v > best or np.isnan(v):
                            best, arg = v, y * width + xx
                out[c, oy, ox] = best
                index[c, oy, ox] = arg


@njit(cache=True)
def _max_pool_backward(grad, index, out):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """out (C x H*W) += grad at each window's arg-max (torch's scatter)."""
    for c in range(grad.shape[0]):
        for k in range(grad.shape[1]):
            out[c, index[c, k]] += grad[c, k]


def _simple_pool(v: torch.Tensor, args: tuple[Any, ...]) -> bool:
    """Batch 1, no padding, no dilation, no ceil mode: the case :func:`_max_pool` runs."""
    kernel, _, padding, dilation, ceil_mode = args
    return v.shape[0] == 1 and not ceil_mode and pair(padding) == (0, 0) and pair(dilation) == (1, 1)


def max_pool(v: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of ``aten.max_pool2d_with_indices(v, kernel, stride, padding, dilation,
    ceil_mode)`` (what autograd runs), in one numba pass for the plain batch-1 case."""
    if not _simple_pool(v, args):
        return torch.ops.aten.max_pool2d_with_indices(v, *args)
    kernel, stride = pair(args[0]), pair(args[1])
    channels, h, w = v.shape[1:]
    shape = (channels, (h - kernel[0]) // stride[0] + 1, (w - kernel[1]) // stride[1] + 1)
    x = v[0].contiguous().numpy()
    out, index = np.empty(shape, x.dtype), np.empty(shape, np.int64)
    _max_pool(x, kernel, stride, out, index)
    return torch.from_numpy(out)[None], torch.from_numpy(index)[None]


def max_pool_backward(grad: torch.Tensor, v: torch.Tensor, index: torch.Tensor, args: tuple[Any, ...]) -> torch.Tensor:
    """dL/dv of :func:`max_pool`: ``aten.max_pool2d_with_indices_backward`` (the scatter in numba)."""
    if not _simple_pool(v, args):
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, v, *args, index)
    channels = grad.shape[1]
    flat = grad.reshape(channels, -1).contiguous().numpy()
    out = np.zeros((v.shape[1], v.shape[2] * v.shape[3]), flat.dtype)
    _max_pool_backward(flat, index.reshape(channels, -1).numpy(), out)
    return torch.from_numpy(out).view(v.shape)


def quantize_grad64(stage: Any, grad: torch.Tensor) -> torch.Tensor:
    """``stage.quantize_grad(grad.double())`` (the gradient onto the 8-bit grid in online mode, LRT v1
    App. C) in one pass."""
    if not stage.quantize_grads:
        return grad.double()
    grid = stage.formats.grad
    return grid_round(grad, grid.lsb, grid.fmt.qmin, grid.fmt.qmax, torch.float64)


class DeviceStep:
    """Forward and written-out backward of one sample through ``net`` (module docstring).

    ``forward(x)`` returns what ``net(x)`` returns (float32 logits) and, in training mode, updates
    the streaming BN statistics as it does; ``backward(grad)`` does what ``logits.backward(grad)``
    does for the update rules: sets ``layer.cache_dz`` of every weight layer and the ``.grad`` of
    every bias and streaming-BN gamma/beta (None where no gradient reaches, as autograd leaves it).
    """

    def __init__(self, net: DeviceNet) -> None:
        missing = unsupported_ops(net)
        if missing:
            raise ValueError(f"DeviceStep does not run op(s) {', '.join(missing)}; use the autograd path")
        self.net = net
        self.ops = list(net.program.ops)
        self.params = [p for stage in net.stages.values() for p in stage.parameters()]
        self.bn_chains = {  # q_out(q_acc(x w) + b) in one pass, as the weight layers' chain
            name: QuantChain([stage.acc_q.stage(), stage.out_q.stage()])
            for name, stage in net.stages.items()
            if isinstance(stage, DeviceBatchNorm)
        }
        self.fold_quantizers = {  # (step, lo, hi, rounding code) of the weight and bias quantizers
            name: np.array(
                [(q.step, q.lo, q.hi, ROUNDING_CODES[q.rounding]) for q in (stage.weight_q, stage.bias_q)],
                dtype=np.float64,
            )
            for name, stage in net.stages.items()
            if isinstance(stage, DeviceBatchNorm)
        }
        self.saved: dict[str, tuple[Any, ...]] = {}
        self.requires: dict[str, bool] = {}

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if list(x.shape[1:]) != net.input_shape[1:]:
            raise ValueError(f"input shape {list(x.shape)} does not match the program's {net.input_shape}")
        if torch.isnan(x).any():
            raise ValueError("input contains NaN; the device cannot quantize it (clean the data first)")
        env: dict[str, torch.Tensor] = {}
        self.saved.clear()
        self.requires.clear()
        for op in self.ops:
            env[op["output"]] = self._forward(op, x, env)
        return env[net.program.output].float()

    def _forward(self, op: dict[str, Any], x: torch.Tensor, env: dict[str, torch.Tensor]) -> torch.Tensor:
        kind, out = op["op"], op["output"]
        net, saved = self.net, self.saved
        if kind == "quantize":
            self.requires[out] = False
            return net.requantizers[out].forward_masked(x.double(), keep_mask=False)[0]
        if kind == "add":
            a, b = (env[name] for name in op["inputs"])
            self.requires[out] = any(self.requires[name] for name in op["inputs"])
            value, mask = net.requantizers[out].forward_masked(a + b, keep_mask=self.requires[out])
            saved[out] = (mask,)
            return value
        v = env[op["input"]]
        requires = self.requires[op["input"]]
        if out in net.stages:
            stage = net.stages[out]
            if isinstance(stage, DeviceLayer):
                return self._layer_forward(stage, v, out)
            return self._bn_forward(stage, v, out, requires)
        self.requires[out] = requires
        if kind == "requantize":
            value, mask = net.requantizers[out].forward_masked(v, keep_mask=requires)
            saved[out] = (mask,)
            return value
        if kind == "reshape":
            saved[out] = (v.shape,)
            return v.reshape(op["shape"])
        if kind == "maxpool":
            stride = op["stride"] if op["stride"] is not None else op["kernel"]
            args = (op["kernel"], stride, op["padding"], op["dilation"], op.get("ceil_mode", False))
            value, index = max_pool(v, *args)
            saved[out] = (v, index, args)
            return value
        if kind == "avgpool":
            window_sum = F.avg_pool2d(v, op["kernel"], op["stride"], op["padding"], divisor_override=1)
            value, mask = net.requantizers[out].forward_masked(window_sum * net.constants[out], keep_mask=requires)
            saved[out] = (v, window_sum.shape, mask)
            return value
        raise ValueError(f"op {kind!r} ({out}) is not run by DeviceStep")

    def _layer_forward(self, layer: DeviceLayer, v: torch.Tensor, out: str) -> torch.Tensor:
        self.requires[out] = True  # the bias is a parameter
        layer.cache_dz = None
        if layer.record:
            layer.cache_input = v
        value, masks = layer.compute(v, layer.bias, keep_masks=True)
        if layer.is_conv:
            layer.out_pixels = int(value.shape[-2] * value.shape[-1])
        self.saved[out] = (v.shape, *masks)
        return value

    def _bn_forward(self, bn: DeviceBatchNorm, v: torch.Tensor, out: str, requires: bool) -> torch.Tensor:
        observe = bn.enabled and bn.training
        if observe or (bn.enabled and bool(bn.refolded)):
            w, b, params = self._bn_fold(bn, v, observe, self.fold_quantizers[out])
        else:
            w, b, params = bn.weight, bn.bias, None
        self.requires[out] = requires or params is not None
        shape = (1, -1, *([1] * (v.dim() - 2)))
        value, (acc_mask, out_mask) = self.bn_chains[out](v * w.view(shape), b, np.float64)
        self.saved[out] = (v, w.view(shape), b.view(shape).shape, acc_mask, out_mask, params, requires)
        return value

    @staticmethod
    def _bn_fold(
        bn: DeviceBatchNorm, v: torch.Tensor, observe: bool, quantizers: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """``bn.observe(v)`` (when ``observe``), then ``bn.folded()`` with the masks of its two
        requantizers: the channel moments in torch (its reduction order), the per-channel EMA, bias
        correction and fold in one numba pass (the same float64 operations in the same order)."""
        channels = bn.mean_ema.shape[0]
        mean, msq = torch.empty(channels, dtype=torch.float64), torch.empty(channels, dtype=torch.float64)
        if observe:
            dims = [d for d in range(v.dim()) if d != 1]
            mean, msq = v.mean(dims), (v * v).mean(dims)
            bn.step += 1
            bn.refolded.fill_(True)
        correction = 1.0 - bn.eta ** max(int(bn.step), 1)
        folded = torch.empty((4, channels), dtype=torch.float64)  # w, b, mu, sigma
        masks = torch.empty((2, channels), dtype=torch.bool)
        _bn_fold(
            bn.mean_ema.numpy(), bn.msq_ema.numpy(), mean.numpy(), msq.numpy(), observe, bn.eta, 1 - bn.eta,
            correction, bn.eps, bn.gamma.detach().numpy(), bn.beta.detach().numpy(),
            quantizers, folded.numpy(), masks.numpy(),
        )  # fmt: skip
        w, b, mu, sigma = folded.unbind(0)
        return w, b, (mu, sigma, masks[0], masks[1])

    # -- backward -------------------------------------------------------------------------------
    def backward(self, grad: torch.Tensor) -> None:
        """Backpropagate ``grad`` (dL/d logits, the shape of :meth:`forward`'s output)."""
        for param in self.params:
            param.grad = None
        grads: dict[str, torch.Tensor] = {self.net.program.output: grad.double()}
        for op in reversed(self.ops):
            g = grads.pop(op["output"], None)
            if g is not None:
                self._backward(op, g, grads)

    def _send(self, grads: dict[str, torch.Tensor], name: str, g: torch.Tensor) -> None:
        """Accumulate ``g`` into the gradient of tensor ``name`` (only tensors that require one)."""
        if not self.requires.get(name, False):
            return
        grads[name] = grads[name] + g if name in grads else g

    def _backward(self, op: dict[str, Any], g: torch.Tensor, grads: dict[str, torch.Tensor]) -> None:
        kind, out = op["op"], op["output"]
        saved = self.saved.get(out)
        if kind == "quantize":
            return
        if kind == "add":
            g = g * saved[0]
            for name in op["inputs"]:
                self._send(grads, name, g)
            return
        source = op["input"]
        if out in self.net.stages:
            stage = self.net.stages[out]
            if isinstance(stage, DeviceLayer):
                self._layer_backward(stage, g, source, grads)
            else:
                self._bn_backward(stage, g, source, grads)
            return
        if kind == "requantize":
            self._send(grads, source, g * saved[0])
        elif kind == "reshape":
            self._send(grads, source, g.reshape(saved[0]))
        elif kind == "maxpool":
            v, index, args = saved
            self._send(grads, source, max_pool_backward(g, v, index, args))
        elif kind == "avgpool":
            v, window_shape, mask = saved
            g_sum = ((g * mask) * self.net.constants[out]).sum_to_size(window_shape)
            stride = op["stride"] if op["stride"] is not None else op["kernel"]
            dx = torch.ops.aten.avg_pool2d_backward(g_sum, v, op["kernel"], stride, op["padding"], False, True, 1)
            self._send(grads, source, dx)

    def _layer_backward(
        self, layer: DeviceLayer, grad: torch.Tensor, source: str, grads: dict[str, torch.Tensor]
    ) -> None:
        """``_LayerStep.backward`` of ``edgetrain.adapt.device``, step for step."""
        shape, out_mask, acc_mask = self.saved[layer.op["output"]]
        grid = layer.formats.grad if layer.out_q.relu and layer.quantize_grads else None
        bias_g, g, dz, nonzero = layer_gradient(grad, grid, acc_mask, out_mask, wmult=layer.wmult)
        layer.bias.grad = bias_g.sum([d for d in range(g.dim()) if d != 1])
        if layer.record:
            layer.cache_dz = dz
        if not self.requires[source]:
            return
        if not nonzero:
            self._send(grads, source, g.new_zeros(shape))
            return
        units = (layer.formats.grad.lsb, math.ldexp(1.0, layer.k_w))
        dx = input_gradient(shape, layer.weight32(), g.float(), layer, units)
        self._send(grads, source, quantize_grad64(layer, dx))

    def _bn_backward(self, bn: DeviceBatchNorm, g: torch.Tensor, source: str, grads: dict[str, torch.Tensor]) -> None:
        """The autograd graph of ``DeviceBatchNorm.forward`` and ``folded``, written out: the
        element-wise part in one numba pass, the sums over pixels in torch (its reduction order)."""
        x, w_view, b_shape, acc_mask, out_mask, params, requires = self.saved[bn.op["output"]]
        grid = bn.formats.grad
        g_y, g_acc_x, dx = torch.empty((3, *g.shape), dtype=torch.float64).unbind(0)
        _bn_backward_pass(
            *(t.contiguous().numpy().reshape(g.shape[0], g.shape[1], -1) for t in (g.double(), out_mask, acc_mask)),
            w_view.reshape(-1).numpy(),
            x.contiguous().numpy().reshape(g.shape[0], g.shape[1], -1),
            bn.out_q.relu,
            bn.quantize_grads,
            grid.lsb,
            float(grid.fmt.qmin),
            float(grid.fmt.qmax),
            *(t.numpy().reshape(g.shape[0], g.shape[1], -1) for t in (g_y, g_acc_x, dx)),
        )
        if requires:
            self._send(grads, source, dx)
        if params is None:
            return
        mu, sigma, w_mask, b_mask = params
        g_w = g_acc_x.sum_to_size(w_view.shape).reshape(w_mask.shape) * w_mask
        g_b = g_y.sum_to_size(b_shape).reshape(b_mask.shape) * b_mask
        bn.beta.grad = g_b
        bn.gamma.grad = g_w / sigma + (-g_b) / sigma * mu


def batch1_executor(net: Any) -> DeviceStep | None:
    """The autograd-free step for ``net`` where one applies (a :class:`DeviceNet` whose ops are all in
    :data:`STEP_OPS`), else None: the trainer then runs the autograd path."""
    if isinstance(net, DeviceNet) and not unsupported_ops(net):
        return DeviceStep(net)
    return None
