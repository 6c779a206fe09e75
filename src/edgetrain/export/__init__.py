"""Deployment: the bit-exact integer program (JSON manifest + safetensors) and an ONNX QDQ export."""

from edgetrain.export.integer import IntegerProgram, IntegerProgramError, to_integer

__all__ = ["IntegerProgram", "IntegerProgramError", "to_integer"]
