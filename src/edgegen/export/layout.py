"""Graph rewrites that change how onnxruntime runs a generator, not what it computes.

The output conv (width -> C = 1 or 3 channels, 3 x 3) is 0.5 % of a generator's multiply-adds,
yet it took a third of the int8 model's time at batch 64 and an eighth of the fp32 model's at
batch 1: onnxruntime runs 4-D convs through its blocked NCHWc kernels, which pad a conv's output
channels to blocks of 16 (a 1-output conv costs as much as a 16-output one) and reorder the
tensors into and out of that layout around it. :func:`split_output_conv` rewrites such a conv,
exactly, as

    x (N, C, H, W) -> Unsqueeze -> (N, C, 1, H, W)
      -> Conv 1x1x1, C -> T = O*kh*kw maps (one per output and tap: a plain GEMM)
      -> Conv 1 x kh x kw, T -> O (fixed 0/1 weights that add each output's taps, shifted) + bias
      -> Squeeze -> (N, O, H, W)

3-D convs are standard ONNX that every runtime runs; onnxruntime runs them through its generic
im2col + GEMM path, without padding or reordering. Measured in interleaved rounds, same pixels:
int8 1.11x faster at batch 1 and 1.13x at batch 64 than one plain conv on the default GAN
(docs/benchmarks.md, export section), and 1.14x / 1.13x than the 2-D split (taps and summing conv
as 4-D convs) it replaces on the shipped GAN; fp32 0.98x / 1.06x on the default GAN, 1.10x /
1.16x on the shipped one.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from edgegen.export import onnx_io, ptq

MAX_MAPS = 32     # O * kh * kw: the output conv of a gray (9) or RGB (27) generator, nothing wider


def split_output_conv(model: onnx.ModelProto, names: list[str] | None = None) -> onnx.ModelProto:
    """``model`` with each float 2-D Conv of ``names`` (default: every one) with at most MAX_MAPS
    output maps rewritten as the 3-D tap split of the module docstring; same function, in place.

    The tap conv is named ``<name>_taps``; the summing conv keeps the conv's name. Convs already
    split (3-D) and wider convs are left as they are, so the rewrite can be applied twice.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    h = onnx.helper
    nodes, split = [], set()
    for n in g.node:
        attrs = {a.name: h.get_attribute_value(a) for a in n.attribute}
        w = numpy_helper.to_array(inits[n.input[1]]) if ptq.is_plain_conv(n) and n.input[1] in inits else None
        if (w is None or w.ndim != 4 or (names is not None and n.name not in names)
                or w.shape[0] * w.shape[2] * w.shape[3] > MAX_MAPS or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
            nodes.append(n)
            continue
        o, c, kh, kw = w.shape
        t, name = o * kh * kw, n.name + "_taps"
        top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])
        split.add(n.input[1])
        g.initializer.extend([
            numpy_helper.from_array(np.ascontiguousarray(w.transpose(0, 2, 3, 1)).reshape(t, c, 1, 1, 1), name + "_w"),
            numpy_helper.from_array(np.array([2], np.int64), name + "_axis"),
            numpy_helper.from_array(np.array([t, t], np.int64), name + "_tt"),
            numpy_helper.from_array(np.array([o, kh, kw, 1, t], np.int64), name + "_shape")])
        nodes += [
            h.make_node("Unsqueeze", [n.input[0], name + "_axis"], [name + "_x"], name=name + "_x"),   # (N, C, 1, H, W)
            h.make_node("Conv", [name + "_x", name + "_w"], [name], name=name, kernel_shape=[1, 1, 1]),  # (N, T, 1, H, W)
            # The summing weight (O, T, 1, kh, kw): 1 where map t is output o's tap (i, j). Built from
            # EyeLike, which onnxruntime folds at load, so the file does not carry O * T * kh * kw zeros.
            h.make_node("ConstantOfShape", [name + "_tt"], [name + "_zero"], name=name + "_zero"),
            h.make_node("EyeLike", [name + "_zero"], [name + "_eye"], name=name + "_eye"),
            h.make_node("Reshape", [name + "_eye", name + "_shape"], [name + "_okk1t"], name=name + "_okk1t"),
            h.make_node("Transpose", [name + "_okk1t"], [name + "_sum"], perm=[0, 4, 3, 1, 2], name=name + "_sum"),
            h.make_node("Conv", [name, name + "_sum", *n.input[2:]], [name + "_y"], name=n.name,
                        kernel_shape=[1, kh, kw], pads=[0, top, left, 0, bottom, right]),         # (N, O, 1, H, W)
            h.make_node("Squeeze", [name + "_y", name + "_axis"], list(n.output), name=name + "_y4")]
    del g.node[:]
    g.node.extend(nodes)
    return onnx_io.remove_unused(model, split)


def activations(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The hidden activations: each Relu, or Clip of a capped ReLU, before the graph's last Conv (the
    Clip of the pixel arithmetic comes after it)."""
    nodes = list(model.graph.node)
    end = max((i for i, n in enumerate(nodes) if n.op_type == "Conv"), default=-1)
    return [n for n in nodes[:end] if n.op_type in ptq.ACTIVATIONS]


def output_layer(model: onnx.ModelProto) -> list[str]:
    """Names of the Convs after the last of the :func:`activations`: the output layer, which stays
    float in int8."""
    nodes = list(model.graph.node)
    acts = activations(model)
    last = nodes.index(acts[-1]) if acts else -1
    return [n.name for n in nodes[last + 1:] if n.op_type == "Conv"]
