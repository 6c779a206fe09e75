"""The integer program: the hand-off between quantization and the device.

An :class:`IntegerProgram` is what a fixed-point target runs and what the device adapts: per
quantizer its bits, sign, exponent k (scale 2^k), rounding and threshold; per weight layer the
integer codes of its (BN-folded) weights and biases; and the op sequence (TQT section 3 and
appendix A; ``docs/quantization.md``). It depends only on :mod:`edgetrain.fixedpoint`: it is built by
``edgetrain.export.exporter.to_integer`` and by the adapting device
(``edgetrain.adapt.DeviceNet.to_program``), and read by the device (``DeviceNet.from_program``).

``IntegerProgram.run(x)`` executes it on integer codes: convolution and linear layers as im2col
matrix products that are exact (float64 BLAS when the 2^53 bound proves it, int64 otherwise), int64
accumulators, shift requantization with round-to-nearest (``edgetrain.fixedpoint.requantize``) and
saturation. Saved as ``manifest.json`` + ``weights.safetensors``; the manifest holds a SHA-256 of the
weight file and a SHA-256 of its own content (quantizers, ops, shapes, MAC widths), so any edit to
either file is refused on load; loading parses JSON and safetensors only.

Integer semantics (docs/quantization.md): inputs are quantized saturating (+-inf and huge values to
the largest/smallest code, NaN rejected, as in the fake-quant model); each conv/linear MAC is
accumulated exactly, then shifted into its accumulator format and saturated there. ``stats`` counts
those accumulator saturations and the largest MAC seen per layer; ``mac_bits()`` gives the width a
hardware MAC needs per layer, worst case over all inputs and observed on the data run so far, and
``save`` writes both into the manifest.

Activations after ReLU/ReLU6 are handled exactly in the integer domain because rounding and clipping
are monotone: ``q(min(max(y, 0), 6)) = min(max(q(y), 0), q(6))``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from edgetrain.atomic import atomic_write, write_json_atomic
from edgetrain.fixedpoint import (
    RELU6_CEILING,
    FixedPointFormat,
    Rounding,
    clip_to_format,
    quantize_to_codes,
    requantize,
    shift_round,
)

FORMAT_NAME = "edgetrain-integer-program"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
OP_FIELDS: dict[str, tuple[str, ...]] = {
    "quantize": ("input", "output", "quantizer"),
    "requantize": ("input", "output", "quantizer", "activation"),
    "conv": (
        "input",
        "output",
        "weight",
        "bias",
        "weight_q",
        "acc_q",
        "bias_q",
        "out_q",
        "activation",
        "stride",
        "padding",
        "dilation",
        "groups",
    ),
    "linear": ("input", "output", "weight", "bias", "weight_q", "acc_q", "bias_q", "out_q", "activation"),
    "scale": ("input", "output", "weight", "bias", "weight_q", "acc_q", "bias_q", "out_q", "activation"),
    "avgpool": ("input", "output", "reciprocal", "recip_q", "out_q", "kernel", "stride", "padding"),
    "add": ("inputs", "output", "out_q", "activation"),
    "leaky_relu": ("input", "output", "alpha", "alpha_q", "prod_q", "out_q"),
    "maxpool": ("input", "output", "kernel", "stride", "padding", "dilation"),
    "concat": ("inputs", "output", "axis"),
    "reshape": ("input", "output", "shape"),
    "sub": ("inputs", "output", "out_q", "activation"),
    "mul": ("inputs", "output", "out_q"),
    "lookup": ("input", "output", "table", "in_q", "out_q"),
    "mean": ("input", "output", "axes", "keepdim", "reciprocal", "recip_q", "out_q"),
    "pad": ("input", "output", "pads"),
    "upsample": ("input", "output", "scale"),
    "transpose": ("input", "output", "perm"),
    "slice": ("input", "output", "axis", "start", "length"),
}
PASSTHROUGH_OPS = ("maxpool", "reshape", "concat", "pad", "upsample", "transpose", "slice")  # codes move, k kept
QUANTIZER_FIELDS = ("role", "bits", "signed", "exponent", "rounding", "threshold", "log2_t")
TENSOR_QUANTIZERS = {
    "weight": "weight_q",
    "bias": "bias_q",
    "reciprocal": "recip_q",
    "alpha": "alpha_q",
    "table": "out_q",  # a lookup table holds output codes
}
TENSOR_FIELDS = tuple(TENSOR_QUANTIZERS)
ACTIVATIONS = ("none", "relu", "relu6")
BATCH = 256  # images per executor chunk (bounds the im2col memory)


class IntegerProgramError(ValueError):
    """A manifest or weight file that is corrupt, inconsistent or not an integer program."""


# ----------------------------------------------------------------------------------------------
# integer kernels (exact integer results; see exact_dot_dtype)


def _windows(
    x: np.ndarray,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    fill: int,
) -> np.ndarray:
    """N x C x Ho x Wo x kh x kw view of the (padded) input windows."""
    xp = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2), constant_values=fill)
    span = ((kernel[0] - 1) * dilation[0] + 1, (kernel[1] - 1) * dilation[1] + 1)
    win = sliding_window_view(xp, span, axis=(2, 3))
    return win[:, :, :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


FLOAT64_EXACT_BOUND = 2**53  # every integer of magnitude <= 2^53 is a float64


def exact_dot_dtype(x: np.ndarray, w: np.ndarray, terms: int) -> type[np.integer] | type[np.floating]:
    """float64 when ``terms * max|x| * max|w| <= 2^53``, else int64.

    Every partial sum of such a dot product is an integer no larger than that bound, so float64
    (BLAS) arithmetic computes it exactly; int64 NumPy products are exact too but never use BLAS.
    """
    bound = terms * int(np.abs(x).max(initial=0)) * int(np.abs(w).max(initial=0))
    return np.float64 if bound <= FLOAT64_EXACT_BOUND else np.int64


def linear_int(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Exact ``x @ w.T`` of int64 codes."""
    dtype = exact_dot_dtype(x, w, w.shape[1])
    return (x.astype(dtype) @ w.T.astype(dtype)).astype(np.int64)


def conv2d_int(
    x: np.ndarray,
    w: np.ndarray,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
) -> np.ndarray:
    """Exact grouped 2-D convolution of int64 codes (cross-correlation, as torch)."""
    n = x.shape[0]
    o, cg, kh, kw = w.shape
    dtype = exact_dot_dtype(x, w, cg * kh * kw)
    win = _windows(x.astype(dtype), (kh, kw), stride, padding, dilation, 0)
    ho, wo = win.shape[2:4]
    # im2col: (g, n*ho*wo, cg*kh*kw) @ (g, cg*kh*kw, o/g), one GEMM per group (BLAS for float64)
    cols = win.reshape(n, groups, cg, ho, wo, kh, kw).transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, n * ho * wo, -1)
    kernel = w.astype(dtype).reshape(groups, o // groups, -1).transpose(0, 2, 1)
    out = np.matmul(cols, kernel).reshape(groups, n, ho, wo, o // groups)
    return out.transpose(1, 0, 4, 2, 3).reshape(n, o, ho, wo).astype(np.int64)


def _ceil_pool_extra(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """End padding that gives torch's ``ceil_mode`` pool output size (the last window must start
    inside the input or the left padding)."""
    span = dilation * (kernel - 1) + 1
    out = -(-(size + 2 * padding - span) // stride) + 1
    if (out - 1) * stride >= size + padding:
        out -= 1
    return max(0, (out - 1) * stride + span - (size + 2 * padding))


def _align(values: list[np.ndarray], exponents: list[int]) -> tuple[list[np.ndarray], int]:
    """Left-shift codes to the smallest exponent (exact)."""
    k = min(exponents)
    return [np.left_shift(v, e - k) for v, e in zip(values, exponents, strict=True)], k


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape(1, -1, *([1] * (ndim - 2)))


def signed_bits(magnitude: int) -> int:
    """Bits of the two's-complement register that holds every integer in ``[-magnitude, magnitude]``."""
    return int(magnitude).bit_length() + 1


@dataclass
class ExecutionStats:
    """What ``IntegerProgram.run`` saw, per weight layer, since the program was built or ``reset``."""

    samples: int = 0
    accumulator_values: dict[str, int] = field(default_factory=dict)  # accumulator entries computed
    accumulator_saturated: dict[str, int] = field(default_factory=dict)  # of those, clipped to the format
    mac_max: dict[str, int] = field(default_factory=dict)  # largest |MAC| before the shift

    def record(self, layer: str, mac: np.ndarray, shifted: np.ndarray, fmt: FixedPointFormat) -> None:
        saturated = int(np.count_nonzero((shifted < fmt.qmin) | (shifted > fmt.qmax)))
        self.accumulator_values[layer] = self.accumulator_values.get(layer, 0) + int(mac.size)
        self.accumulator_saturated[layer] = self.accumulator_saturated.get(layer, 0) + saturated
        self.mac_max[layer] = max(self.mac_max.get(layer, 0), int(np.abs(mac).max(initial=0)))

    @property
    def saturated_total(self) -> int:
        return sum(self.accumulator_saturated.values())


@dataclass
class IntegerProgram:
    """Quantizers, integer tensors and the op sequence of a fixed-point network (see module docstring)."""

    quantizers: dict[str, dict[str, Any]]
    ops: list[dict[str, Any]]
    tensors: dict[str, np.ndarray]
    input: str
    output: str
    input_shape: list[int]
    shapes: dict[str, list[int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)  # provenance: model, dataset, preprocessing
    stats: ExecutionStats = field(default_factory=ExecutionStats, compare=False, repr=False)

    # -- execution
    def fmt(self, name: str) -> FixedPointFormat:
        q = self.quantizers[name]
        return FixedPointFormat(int(q["bits"]), bool(q["signed"]))

    def _requantize(self, codes: np.ndarray, exponent: int, qname: str, activation: str = "none") -> np.ndarray:
        q = self.quantizers[qname]
        fmt, k, rounding = self.fmt(qname), int(q["exponent"]), q["rounding"]
        out = requantize(codes, exponent, k, fmt, rounding)
        if activation in ("relu", "relu6"):
            out = np.maximum(out, 0)
        if activation == "relu6":
            ceiling = np.clip(shift_round(np.array([int(RELU6_CEILING)]), k, rounding), fmt.qmin, fmt.qmax)
            out = np.minimum(out, ceiling[0])
        return out

    def _k(self, qname: str) -> int:
        return int(self.quantizers[qname]["exponent"])

    def run(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Execute on a float batch (N x C x H x W); returns float32 outputs ``codes * 2^k``.

        Raises ValueError for an empty batch, a wrong shape, integer or non-numeric dtypes (images
        must be scaled like the training data) and NaN (see the module docstring)."""
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(
                f"input dtype {x.dtype} is not floating point: pass float images scaled as in training "
                "(e.g. uint8 pixels / 255), not raw integers"
            )
        if x.ndim != len(self.input_shape) or list(x.shape[1:]) != list(self.input_shape[1:]):
            raise ValueError(
                f"input shape {list(x.shape)} does not match the program's input N x "
                + " x ".join(map(str, self.input_shape[1:]))
            )
        if len(x) == 0:
            raise ValueError("empty batch: the input holds 0 samples")
        outputs = np.concatenate([self._run(x[i : i + BATCH]) for i in range(0, len(x), BATCH)])
        self.stats.samples += len(x)
        return outputs

    def _run(self, x: np.ndarray) -> np.ndarray:
        env: dict[str, tuple[np.ndarray, int]] = {}
        for op in self.ops:
            env[op["output"]] = self._execute(op, x, env)
        codes, k = env[self.output]
        return np.ldexp(codes.astype(np.float64), k).astype(np.float32)

    def _execute(
        self, op: dict[str, Any], x: np.ndarray, env: dict[str, tuple[np.ndarray, int]]
    ) -> tuple[np.ndarray, int]:
        kind = op["op"]
        if kind == "quantize":
            q, k = self.quantizers[op["quantizer"]], self._k(op["quantizer"])
            return quantize_to_codes(x, k, self.fmt(op["quantizer"]), q["rounding"]), k
        if kind in PASSTHROUGH_OPS:
            return self._passthrough(op, env)
        if kind in ("add", "sub"):
            (a, ka), (b, kb) = (env[name] for name in op["inputs"])
            (a, b), k = _align([a, b], [ka, kb])
            return self._requantize(a + b if kind == "add" else a - b, k, op["out_q"], op["activation"]), self._k(
                op["out_q"]
            )
        if kind == "mul":  # exact product of the codes at exponent k_a + k_b, then one shift
            (a, ka), (b, kb) = (env[name] for name in op["inputs"])
            return self._requantize(a * b, ka + kb, op["out_q"]), self._k(op["out_q"])
        codes, k_in = env[op["input"]]
        if kind == "requantize":
            return self._requantize(codes, k_in, op["quantizer"], op["activation"]), self._k(op["quantizer"])
        if kind in ("conv", "linear", "scale"):
            return self._compute(op, codes, k_in)
        if kind == "avgpool":
            win = _windows(codes, op["kernel"], op["stride"], op["padding"], (1, 1), 0)
            acc = win.sum(axis=(-2, -1)) * self.tensors[op["reciprocal"]]
            return self._requantize(acc, k_in + self._k(op["recip_q"]), op["out_q"]), self._k(op["out_q"])
        if kind == "leaky_relu":
            prod = self._requantize(codes * self.tensors[op["alpha"]], k_in + self._k(op["alpha_q"]), op["prod_q"])
            (a, b), k = _align([codes, prod], [k_in, self._k(op["prod_q"])])
            return self._requantize(np.maximum(a, b), k, op["out_q"]), self._k(op["out_q"])
        if kind == "mean":
            acc = codes.sum(axis=tuple(op["axes"]), keepdims=bool(op["keepdim"])) * self.tensors[op["reciprocal"]]
            return self._requantize(acc, k_in + self._k(op["recip_q"]), op["out_q"]), self._k(op["out_q"])
        if kind == "lookup":
            return self._lookup(op, codes, k_in), self._k(op["out_q"])
        raise IntegerProgramError(f"unknown op {kind!r}")

    def _passthrough(self, op: dict[str, Any], env: dict[str, tuple[np.ndarray, int]]) -> tuple[np.ndarray, int]:
        kind = op["op"]
        if kind == "concat":
            parts = [env[name] for name in op["inputs"]]
            if len({k for _, k in parts}) != 1:
                raise IntegerProgramError(f"concat {op['output']!r}: inputs have different exponents")
            return np.concatenate([c for c, _ in parts], axis=int(op["axis"])), parts[0][1]
        codes, k = env[op["input"]]
        if kind == "reshape":
            return codes.reshape(op["shape"]), k
        if kind == "pad":  # ONNX order: begins of every axis, then ends; zeros
            half = len(op["pads"]) // 2
            return np.pad(codes, list(zip(op["pads"][:half], op["pads"][half:], strict=True))), k
        if kind == "upsample":  # nearest, integer factors: every pixel repeated
            return np.repeat(np.repeat(codes, op["scale"][0], axis=2), op["scale"][1], axis=3), k
        if kind == "transpose":
            return np.transpose(codes, op["perm"]), k
        if kind == "slice":
            start = int(op["start"])
            return np.take(codes, np.arange(start, start + int(op["length"])), axis=int(op["axis"])), k
        fill = np.iinfo(np.int64).min
        if op.get("ceil_mode", False):  # torch's ceil_mode: extra windows at the end, over -inf padding
            extra = [
                _ceil_pool_extra(size, *params)
                for size, params in zip(
                    codes.shape[2:],
                    zip(op["kernel"], op["stride"], op["padding"], op["dilation"], strict=True),
                    strict=True,
                )
            ]
            codes = np.pad(codes, ((0, 0), (0, 0), (0, extra[0]), (0, extra[1])), constant_values=fill)
        win = _windows(codes, op["kernel"], op["stride"], op["padding"], op["dilation"], fill)
        return win.max(axis=(-2, -1)), k

    def _lookup(self, op: dict[str, Any], codes: np.ndarray, k_in: int) -> np.ndarray:
        """T[code - n_in]: the table holds the output codes of f on the input grid (one row per channel
        when 2-D)."""
        if k_in != self._k(op["in_q"]):
            raise IntegerProgramError(f"lookup {op['output']!r}: input exponent {k_in} is not its table's")
        table = self.tensors[op["table"]]
        index = codes - self.fmt(op["in_q"]).qmin
        if table.ndim == 1:
            return table[index]
        return table[_channel(np.arange(len(table)), codes.ndim), index]

    def _compute(self, op: dict[str, Any], codes: np.ndarray, k_in: int) -> tuple[np.ndarray, int]:
        """q_out(act(q_acc(sum w x) + b)): int64 accumulate, shift to the int16 accumulator, add bias."""
        w = self.tensors[op["weight"]]
        if op["op"] == "conv":
            acc = conv2d_int(codes, w, op["stride"], op["padding"], op["dilation"], int(op["groups"]))
        elif op["op"] == "linear":
            acc = linear_int(codes, w)
        else:
            acc = codes * _channel(w, codes.ndim)
        acc_fmt = self.fmt(op["acc_q"])
        shifted = shift_round(
            acc, self._k(op["acc_q"]) - k_in - self._k(op["weight_q"]), self.quantizers[op["acc_q"]]["rounding"]
        )
        self.stats.record(op["weight"], acc, shifted, acc_fmt)
        acc = clip_to_format(shifted, acc_fmt)
        bias = _channel(self.tensors[op["bias"]], acc.ndim)
        (acc, bias), k = _align([acc, bias], [self._k(op["acc_q"]), self._k(op["bias_q"])])
        return self._requantize(acc + bias, k, op["out_q"], op["activation"]), self._k(op["out_q"])

    # -- MAC widths
    def mac_bits(self) -> dict[str, dict[str, Any]]:
        """Per weight layer: the signed MAC width (bits) before the shift into the accumulator.

        ``worst_case`` = bits of ``max_o sum_j |w_oj| * max|x|`` with ``max|x|`` the largest code
        of the layer's input format (any input); ``observed`` = bits of the largest |MAC| in
        ``stats`` (None before any run), over ``stats.samples`` samples.
        """
        largest: dict[str, int] = {self.input: 0}
        widths: dict[str, dict[str, Any]] = {}
        for op in self.ops:
            sources = op["inputs"] if "inputs" in op else [op["input"]]
            qname = op.get("out_q", op.get("quantizer"))
            if qname is not None:
                fmt = self.fmt(qname)
                largest[op["output"]] = max(-fmt.qmin, fmt.qmax)
            else:  # maxpool, reshape, concat keep their input's codes
                largest[op["output"]] = max(largest.get(name, 0) for name in sources)
            if op["op"] in ("conv", "linear", "scale"):
                w = np.abs(self.tensors[op["weight"]])
                row_sums = w.reshape(len(w), -1).sum(axis=1) if op["op"] != "scale" else w
                worst = int(row_sums.max(initial=0)) * largest.get(op["input"], 0)
                observed = self.stats.mac_max.get(op["weight"])
                widths[op["weight"]] = {
                    "worst_case": signed_bits(worst),
                    "observed": None if observed is None else signed_bits(observed),
                    "accumulator": self.fmt(op["acc_q"]).bits,
                    "observed_samples": self.stats.samples,
                }
        return widths

    # -- persistence
    def manifest(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "input": self.input,
            "output": self.output,
            "input_shape": self.input_shape,
            "quantizers": self.quantizers,
            "ops": self.ops,
            "shapes": self.shapes,
            "meta": self.meta,
            "mac_bits": self.mac_bits(),
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``weights.safetensors`` then ``manifest.json`` (each atomically, ``edgetrain.atomic``)."""
        folder = Path(directory)
        tensors = {name: _narrow(codes) for name, codes in self.tensors.items()}
        atomic_write(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
        digest = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
        manifest = self.manifest() | {"weights_sha256": digest}
        write_json_atomic(folder / MANIFEST_FILE, manifest | {"manifest_sha256": manifest_digest(manifest)})
        return folder

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> IntegerProgram:
        """Read a saved program (JSON + safetensors only); raises IntegerProgramError when corrupt."""
        folder = Path(directory)
        manifest_path, weights_path = folder / MANIFEST_FILE, folder / WEIGHTS_FILE
        for path in (manifest_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"integer program file missing: {path}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise IntegerProgramError(f"{manifest_path}: not valid JSON ({err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
            raise IntegerProgramError(f"{manifest_path}: not an {FORMAT_NAME} manifest")
        if manifest.get("version") != FORMAT_VERSION:
            raise IntegerProgramError(f"{manifest_path}: unsupported version {manifest.get('version')!r}")
        recorded = manifest.pop("manifest_sha256", None)
        if recorded != manifest_digest(manifest):
            raise IntegerProgramError(
                f"{manifest_path}: its SHA-256 does not match its content (edited or written by an older "
                "edgetrain); export the program again"
            )
        blob = weights_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest.get("weights_sha256"):
            raise IntegerProgramError(f"{weights_path}: SHA-256 does not match the manifest (corrupt or replaced)")
        try:
            arrays = load_file(str(weights_path))
        except (SafetensorError, ValueError, TypeError, KeyError, OverflowError, MemoryError) as err:  # crafted header
            raise IntegerProgramError(
                f"{weights_path}: unreadable safetensors file ({type(err).__name__}: {err})"
            ) from None
        floats = sorted(k for k, v in arrays.items() if not np.issubdtype(v.dtype, np.integer))
        if floats:
            raise IntegerProgramError(f"{weights_path}: tensors {floats[:3]} are not integer codes")
        tensors = {k: v.astype(np.int64) for k, v in arrays.items()}
        try:
            program = cls(
                quantizers=manifest["quantizers"],
                ops=manifest["ops"],
                tensors=tensors,
                input=manifest["input"],
                output=manifest["output"],
                input_shape=manifest["input_shape"],
                shapes=manifest.get("shapes", {}),
                meta=manifest.get("meta", {}),
            )
        except KeyError as err:
            raise IntegerProgramError(f"{manifest_path}: missing field {err}") from None
        program.validate()
        return program

    def validate(self) -> None:
        """Check that every op, quantizer and tensor reference is well formed and every code in range."""
        if not isinstance(self.quantizers, dict) or not isinstance(self.ops, list):
            raise IntegerProgramError("manifest: 'quantizers' must be an object and 'ops' a list")
        for name, q in self.quantizers.items():
            missing = [f for f in QUANTIZER_FIELDS if f not in q]
            if missing:
                raise IntegerProgramError(f"quantizer {name!r}: missing {missing}")
            try:
                FixedPointFormat(q["bits"], q["signed"])
                Rounding.parse(q["rounding"])
            except (TypeError, ValueError) as err:
                raise IntegerProgramError(f"quantizer {name!r}: {err}") from None
            if not isinstance(q["exponent"], int):
                raise IntegerProgramError(f"quantizer {name!r}: exponent must be an integer")
        defined = {self.input}
        for i, op in enumerate(self.ops):
            kind = op.get("op") if isinstance(op, dict) else None
            if kind not in OP_FIELDS:
                raise IntegerProgramError(f"op {i}: unknown op {kind!r}; known: {sorted(OP_FIELDS)}")
            missing = [f for f in OP_FIELDS[kind] if f not in op]
            if missing:
                raise IntegerProgramError(f"op {i} ({kind}): missing {missing}")
            sources = op["inputs"] if "inputs" in op else [op["input"]]
            if kind != "quantize" and any(s not in defined for s in sources):
                raise IntegerProgramError(f"op {i} ({kind}): input used before it is defined: {sources}")
            for key, value in op.items():
                if key.endswith("_q") or key == "quantizer":
                    if value not in self.quantizers:
                        raise IntegerProgramError(f"op {i} ({kind}): unknown quantizer {value!r}")
                if key in TENSOR_FIELDS and value not in self.tensors:
                    raise IntegerProgramError(f"op {i} ({kind}): tensor {value!r} missing from the weight file")
            if op.get("activation", "none") not in ACTIVATIONS:
                raise IntegerProgramError(f"op {i} ({kind}): unknown activation {op['activation']!r}")
            for key, qkey in TENSOR_QUANTIZERS.items():
                if key in op:
                    fmt, codes = self.fmt(op[qkey]), self.tensors[op[key]]
                    if codes.size and (codes.min() < fmt.qmin or codes.max() > fmt.qmax):
                        raise IntegerProgramError(f"op {i} ({kind}): {key} codes outside {fmt} range")
            if kind == "lookup":
                entries, table = 2 ** self.fmt(op["in_q"]).bits, self.tensors[op["table"]]
                if table.ndim not in (1, 2) or table.shape[-1] != entries:
                    raise IntegerProgramError(f"op {i} (lookup): table shape {table.shape}, needs {entries} entries")
            defined.add(op["output"])
        if self.output not in defined:
            raise IntegerProgramError(f"output {self.output!r} is not produced by any op")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON (sorted keys), without its own digest field."""
    content = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _narrow(codes: np.ndarray) -> np.ndarray:
    """The smallest integer dtype that holds the codes."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if codes.size == 0 or (codes.min() >= info.min and codes.max() <= info.max):
            return np.ascontiguousarray(codes.astype(dtype))
    return np.ascontiguousarray(codes.astype(np.int64))
