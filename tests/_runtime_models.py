"""Tiny contract-following ONNX models for the runtime tests (onnx.helper; no torch, no training).

GAN / VAE decoder: z (N, L) float32 [+ label (N,) int64] -> MatMul (+ Gather class embedding)
-> Sigmoid -> *255 +0.5 -> Cast uint8 -> Reshape (N, H, W, C) ``image``. VAE encoder: ``image``
uint8 NHWC [+ label] -> Cast -> /255 -> MatMul -> ``mean``, ``logvar``. Each carries real
:class:`ModelMeta` metadata, so the runtime sees exactly what export writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgegen import __version__
from edgegen.modelmeta import ModelMeta

CLASSES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def _finish(nodes, inputs, outputs, inits, meta: ModelMeta, path: Path) -> Path:
    graph = helper.make_graph(nodes, meta.kind, inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in meta.to_props().items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def make_decoder(path: Path, *, kind: str = "gan", latent: int = 8, size: int = 8, channels: int = 1,
                 conditional: bool = False, seed: int = 0, quantization: str = "fp32") -> Path:
    """Write a tiny generator (GAN or VAE decoder) following the contract to ``path``."""
    rng = np.random.default_rng(seed)
    d = size * size * channels
    w = rng.normal(0, 1.0, (latent, d)).astype(np.float32)                 # (L, H*W*C)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([255.0], np.float32), "scale"),
             numpy_helper.from_array(np.array([0.5], np.float32), "half"),
             numpy_helper.from_array(np.array([-1, size, size, channels], np.int64), "shape")]
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", latent])]
    nodes = [helper.make_node("MatMul", ["z", "W"], ["h0"])]
    h = "h0"
    if conditional:
        emb = rng.normal(0, 2.0, (len(CLASSES), d)).astype(np.float32)     # (K, H*W*C) per-class offset
        inits.append(numpy_helper.from_array(emb, "E"))
        inputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
        nodes += [helper.make_node("Gather", ["E", "label"], ["e"], axis=0), helper.make_node("Add", ["h0", "e"], ["h1"])]
        h = "h1"
    nodes += [helper.make_node("Sigmoid", [h], ["s"]), helper.make_node("Mul", ["s", "scale"], ["p"]),
              helper.make_node("Add", ["p", "half"], ["r"]), helper.make_node("Cast", ["r"], ["u"], to=TensorProto.UINT8),
              helper.make_node("Reshape", ["u", "shape"], ["image"])]
    outputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, channels])]
    meta = ModelMeta(kind=kind, latent_dim=latent, image_size=size, channels=channels, version=__version__,
                     class_names=CLASSES if conditional else (), conditional=conditional, data_name="tiny",
                     quantization=quantization, model_fingerprint=f"tiny-{kind}-{seed}")
    return _finish(nodes, inputs, outputs, inits, meta, path)


def make_lying_decoder(path: Path, *, flat: bool = False, float_out: bool = False) -> Path:
    """A GAN whose graph breaks its metadata (uint8 (N, 8, 8, 1), latent 8): its ``image`` output is
    declared and computed as (N, 64) when ``flat``, as float32 when ``float_out``."""
    w = np.random.default_rng(0).normal(0, 1.0, (8, 64)).astype(np.float32)                  # (L, H*W*C)
    shape = [-1, 64] if flat else [-1, 8, 8, 1]
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(shape, np.int64), "shape")]
    nodes = [helper.make_node("MatMul", ["z", "W"], ["h"])]
    if not float_out:
        nodes.append(helper.make_node("Cast", ["h"], ["u"], to=TensorProto.UINT8))
    nodes.append(helper.make_node("Reshape", ["h" if float_out else "u", "shape"], ["image"]))
    out_type = TensorProto.FLOAT if float_out else TensorProto.UINT8
    outputs = [helper.make_tensor_value_info("image", out_type, ["N", *shape[1:]])]
    meta = ModelMeta(kind="gan", latent_dim=8, image_size=8, channels=1, version=__version__, data_name="tiny")
    inputs = [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])]
    return _finish(nodes, inputs, outputs, inits, meta, path)


def make_encoder(path: Path, *, latent: int = 8, size: int = 8, channels: int = 1, conditional: bool = False,
                 seed: int = 1) -> Path:
    """Write a tiny VAE encoder (uint8 NHWC image [+ label] -> mean, logvar) to ``path``."""
    rng = np.random.default_rng(seed)
    d = size * size * channels
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (d, latent)).astype(np.float32), "Wm"),
             numpy_helper.from_array(rng.normal(0, 0.1, (d, latent)).astype(np.float32), "Wv"),
             numpy_helper.from_array(np.array([255.0], np.float32), "scale"),
             numpy_helper.from_array(np.array([-1, d], np.int64), "flat")]
    inputs = [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", size, size, channels])]
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["f", "flat"], ["x0"]), helper.make_node("Div", ["x0", "scale"], ["x"]),
             helper.make_node("MatMul", ["x", "Wv"], ["logvar"])]
    if conditional:
        inits.append(numpy_helper.from_array(rng.normal(0, 1, (len(CLASSES), latent)).astype(np.float32), "E"))
        inputs.append(helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]))
        nodes += [helper.make_node("MatMul", ["x", "Wm"], ["m0"]), helper.make_node("Gather", ["E", "label"], ["e"], axis=0),
                  helper.make_node("Add", ["m0", "e"], ["mean"])]
    else:
        nodes.append(helper.make_node("MatMul", ["x", "Wm"], ["mean"]))
    outputs = [helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["N", latent]),
               helper.make_tensor_value_info("logvar", TensorProto.FLOAT, ["N", latent])]
    meta = ModelMeta(kind="vae-encoder", latent_dim=latent, image_size=size, channels=channels, version=__version__,
                     class_names=CLASSES if conditional else (), conditional=conditional, data_name="tiny")
    return _finish(nodes, inputs, outputs, inits, meta, path)


def make_plain_onnx(path: Path) -> Path:
    """A valid ONNX file without edgegen metadata (Identity z -> image)."""
    graph = helper.make_graph([helper.make_node("Identity", ["z"], ["image"])], "plain",
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path
