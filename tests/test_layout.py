"""The output-conv split (edgegen.export.layout): same function, idempotent, only what it should touch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgegen.export import layout, onnx_io


def _conv_model(out_channels: int, pads: list[int], in_channels: int = 5) -> onnx.ModelProto:
    rng = np.random.default_rng(out_channels)
    w = rng.standard_normal((out_channels, in_channels, 3, 3)).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    h, wd = 6 + pads[0] + pads[2] - 2, 7 + pads[1] + pads[3] - 2
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="out", pads=pads, kernel_shape=[3, 3])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", in_channels, 6, 7])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", out_channels, h, wd])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.mark.parametrize("out_channels,pads", [(1, [1, 1, 1, 1]), (3, [1, 1, 1, 1]), (1, [0, 1, 2, 0])])
def test_split_keeps_the_function(out_channels, pads):
    model = _conv_model(out_channels, pads)
    split = layout.split_output_conv(onnx.ModelProto.FromString(model.SerializeToString()))
    onnx.checker.check_model(split, full_check=True)
    ops = [n.op_type for n in split.graph.node]
    assert ops.count("Conv") == 2 and ops[0] == "Unsqueeze" and ops[-1] == "Squeeze"
    assert "w" not in {t.name for t in split.graph.initializer}                 # the 4-D weight is gone
    assert {n.domain for n in split.graph.node} <= {"", "ai.onnx"}
    x = np.random.default_rng(1).standard_normal((2, 5, 6, 7)).astype(np.float32)
    np.testing.assert_allclose(_run(split, x), _run(model, x), atol=1e-5)
    # onnxruntime runs both as plain convs: no blocked NCHWc kernel, no layout reorders.
    assert not [k for k in onnx_io.runtime_op_counts(split) if "nchwc" in k or "Reorder" in k]


def test_split_is_idempotent_and_selective():
    model = layout.split_output_conv(_conv_model(1, [1, 1, 1, 1]))
    once = model.SerializeToString()
    assert layout.split_output_conv(model).SerializeToString() == once           # 3-D convs are left alone
    untouched = _conv_model(1, [1, 1, 1, 1])
    assert len(layout.split_output_conv(untouched, ["other"]).graph.node) == 1  # not named
    wide = _conv_model(4, [1, 1, 1, 1])                                         # 36 maps > MAX_MAPS
    assert [n.op_type for n in layout.split_output_conv(wide).graph.node] == ["Conv"]


def test_output_layer_is_the_convs_after_the_last_relu():
    model = layout.split_output_conv(_conv_model(1, [1, 1, 1, 1]))
    relu = helper.make_node("Relu", ["x0"], ["x"], name="relu")
    model.graph.node.insert(0, relu)
    model.graph.input[0].name = "x0"
    assert layout.output_layer(model) == ["out_taps", "out"]


def test_output_layer_skips_the_pixels_clip():
    """A capped ReLU is a Clip, and so is the pixel clamp after the output conv: only the first counts."""
    model = layout.split_output_conv(_conv_model(1, [1, 1, 1, 1]))
    model.graph.node.insert(0, helper.make_node("Clip", ["x0"], ["x"], name="cap"))
    model.graph.node.append(helper.make_node("Clip", [model.graph.output[0].name], ["pixels"], name="pixels"))
    model.graph.input[0].name = "x0"
    assert layout.output_layer(model) == ["out_taps", "out"]
