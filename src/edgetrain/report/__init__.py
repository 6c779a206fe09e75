"""Reports: markdown + self-contained HTML with matplotlib plots."""

from edgetrain.report.document import Report

__all__ = ["Report"]
