"""edgegen: small image generators for CPUs and edge devices, shipped safely.

Stages, one subpackage each:
    edgegen.training  data, GAN/VAE models, training loops, evaluation (torch)
    edgegen.export    torch -> ONNX with metadata, int8/fp16 quantization (torch, onnx)
    edgegen.runtime   onnxruntime inference and batch generation (no torch)
    edgegen.safety    watermarking and memorization audit (no torch)
"""

__version__ = "0.1.0"

from edgegen.errors import EdgegenError

__all__ = ["EdgegenError", "__version__"]
