"""Export and quantization: trained runs -> self-describing ONNX files (fp32, int8, fp16).

    export_run(run, out_path)              fp32 ONNX (+ VAE encoder), parity-checked   (needs torch)
    quantize_model(in_path, out_path, ...) int8 (QDQ) or fp16 copy behind quality/speed gates

Imports are lazy so that ``quantize_model`` works without torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["export_run", "quantize_model"]


def __getattr__(name: str) -> Any:
    if name == "export_run":
        from edgegen.export.onnx_export import export_run
        return export_run
    if name == "quantize_model":
        from edgegen.export.quantize import quantize_model
        return quantize_model
    raise AttributeError(name)
