"""Deployment: the bit-exact integer program (JSON manifest + safetensors) and an ONNX QDQ export."""

from edgetrain.export.integer import IntegerProgram, IntegerProgramError, to_integer
from edgetrain.export.onnx import ort_session, program_to_onnx, to_onnx

__all__ = ["IntegerProgram", "IntegerProgramError", "ort_session", "program_to_onnx", "to_integer", "to_onnx"]
