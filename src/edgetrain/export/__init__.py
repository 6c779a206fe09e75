"""Deployment: the bit-exact integer program (``program``: manifest + safetensors + integer executor),
its exporter from a fake-quantized model (``exporter``) and an ONNX QDQ export (``onnx``)."""

from edgetrain.export.exporter import to_integer
from edgetrain.export.onnx import ort_session, program_to_onnx, to_onnx
from edgetrain.export.program import IntegerProgram, IntegerProgramError

__all__ = ["IntegerProgram", "IntegerProgramError", "ort_session", "program_to_onnx", "to_integer", "to_onnx"]
