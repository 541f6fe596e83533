"""Torch-free inference: load an exported edgegen model and generate images (numpy + onnxruntime).

What apps embed (:class:`Generator`) and what batch jobs run (:func:`run_generate`). Nothing in
this package imports torch; Ray is imported only when the Ray engine is asked for.
"""

from edgegen.runtime.generator import Generator, cpu_count, default_model_path, session_options
from edgegen.runtime.latent import latents

__all__ = ["Generator", "cpu_count", "default_model_path", "latents", "session_options"]
