"""Quantization: int8 op counts (build, quantize, count, compare), gates, fp16 closeness, bad input.

The speed gate is skipped (``speed_gate=False``): no timing in tests. Tiny random generators do not
reach the 99 %-within-2/255 int8 gate (their outputs use the whole pixel range, unlike trained
models' saturated backgrounds), so int8 models here are written with ``force=True`` and the tests
check the measured figures and that a broken calibration is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgegen.errors import EdgegenError
from edgegen.export import export_run, quantize_model
from edgegen.export import layout, onnx_io
from edgegen.modelmeta import ModelMeta

from test_export import make_gan_run, make_vae_run


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    run, _ = make_gan_run(root)
    export_run(run, root / "g.onnx")
    return root / "g.onnx"


@pytest.fixture(scope="module")
def int8(fp32):
    out = fp32.with_name("g.int8.onnx")
    meta = quantize_model(fp32, out, mode="int8", force=True, speed_gate=False)
    return out, meta


def _run(path, z, labels=None):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    feed = {"z": z} if labels is None else {"z": z, "label": labels}
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def test_int8_op_counts(fp32, int8):
    path, meta = int8
    src, q = onnx.load(fp32), onnx.load(path)
    n_conv = sum(n.op_type == "Conv" for n in src.graph.node)
    file_ops = onnx_io.op_counts(q)
    # Portable: the file holds standard ai.onnx ops only (QDQ), no com.microsoft contrib ops.
    assert {n.domain for n in q.graph.node} <= {"", "ai.onnx"}
    assert file_ops["QuantizeLinear"] >= n_conv and file_ops["DequantizeLinear"] >= n_conv
    # What onnxruntime runs: every conv but the float output layer (the export split it into a tap
    # conv and a summing conv, edgegen.export.layout) is a QLinearConv; the Linear is a float Gemm
    # (weight-only int8: its int8 weights are turned into float once, at session start).
    out_layer = layout.output_layer(src)
    assert out_layer == [n.name for n in src.graph.node if n.op_type == "Conv"][-2:]
    assert meta.extra["gates"]["float_nodes"] == out_layer
    rt = onnx_io.runtime_op_counts(q)
    assert rt.get("QLinearConv", 0) + rt.get("com.microsoft.QLinearConv", 0) == n_conv - 2
    assert "com.microsoft.QGemm" not in rt and rt.get("Gemm", 0) + rt.get("com.microsoft.FusedGemm", 0) == 1
    # The float output layer runs as two plain 3-D convs: no blocked (NCHWc) conv, no layout reorders,
    # and its fixed summing kernel is folded at load.
    assert rt.get("Conv", 0) == 2 and "EyeLike" not in rt
    assert not [k for k in rt if "nchwc" in k or "Reorder" in k]
    # One Q after the Linear and one DQ before the float tail: no dequantize-float-quantize in between,
    # and no weight dequantized per run.
    assert rt.get("QuantizeLinear", 0) == 1 and rt.get("DequantizeLinear", 0) == 1
    assert meta.extra["gates"]["runtime_ops"] == rt
    # Every large weight is stored in 8 bits (the float output conv is tiny).
    assert not [t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) > 1000]


def test_gemm_weights_and_bias_are_stored_int8_and_folded_at_load(fp32, int8):
    from onnx import numpy_helper

    src = onnx.load(fp32)
    inits = {t.name: numpy_helper.to_array(t) for t in src.graph.initializer}
    gemm = next(n for n in src.graph.node if n.op_type == "Gemm")
    w, b = inits[gemm.input[1]], inits[gemm.input[2]]                          # (out, in), (out,)
    channels = inits[next(n for n in src.graph.node if n.op_type == "Conv").input[1]].shape[1]
    # In the int8 file both are int8, stored one row group per channel of the conv the Linear feeds,
    # on one float16 scale per group (the bias's times one constant); no float32 or int32 vector of
    # `out` biases is left.
    q = {t.name: numpy_helper.to_array(t) for t in onnx.load(int8[0]).graph.initializer}
    assert [a.shape for a in q.values() if a.dtype == np.int8 and a.size in (w.size, b.size)] == \
        [(channels, w.size // channels), (channels, b.size // channels)]
    assert sum(a.dtype == np.float16 and a.shape == (channels, 1) for a in q.values()) == 1   # the group scales
    assert not any(a.dtype in (np.int32, np.float32) and a.shape == b.shape for a in q.values())
    assert all(len(name) < 40 for name in q)               # the quantizer's long suffixes are shortened
    # onnxruntime folds the Cast, Mul and Reshape of these constants when the session opens: the
    # graph it runs holds one Gemm and none of them.
    rt = onnx_io.runtime_op_counts(onnx.load(int8[0]))
    assert rt.get("Gemm", 0) + rt.get("com.microsoft.FusedGemm", 0) == 1 and "Shape" not in rt and "Concat" not in rt


def test_sessions_keep_int8_convs_channels_first(int8, tmp_path):
    # edgegen's sessions skip onnxruntime's NHWC transformer (faster for our int8 graphs, see
    # runtime.generator): their QLinearConvs (and the Resize between them) run channels-first,
    # while onnxruntime on its own moves them to channels-last.
    def channels_last(disabled):
        path = str(tmp_path / f"opt{disabled is None}.onnx")
        onnx_io.session(onnx.load(int8[0]), 1, optimized_path=path, disabled_optimizers=disabled)
        convs = [n for n in onnx.load(path).graph.node if n.op_type == "QLinearConv"]
        assert convs
        return {onnx.helper.get_attribute_value(a) for n in convs for a in n.attribute if a.name == "channels_last"}

    assert channels_last(()) == {1}
    assert channels_last(None) <= {0}


def test_int8_metadata_and_quality(fp32, int8):
    path, meta = int8
    back = onnx_io.read_meta(onnx.load(path))
    assert back == meta and back.quantization == "int8" and back.kind == "gan"
    g = back.extra["gates"]
    assert g["format"] == "QDQ" and g["speed"] == "not measured" and g["fcd"].startswith("skipped")
    assert g["psnr_median_db"] >= 35.0                       # the PSNR gate holds even on a random net
    assert g["within_2_frac"] > 0.8 and g["size_ratio_vs_fp32"] > 2.5
    assert back.extra["quantized_from"] == onnx_io.read_meta(onnx.load(fp32)).model_fingerprint
    z = np.random.default_rng(9).standard_normal((16, 16)).astype(np.float32)
    a, b = _run(fp32, z), _run(path, z)
    assert b.dtype == np.uint8 and b.shape == a.shape
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 2.0
    assert np.array_equal(_run(path, z[4:5])[0], b[4])      # int8 is batch independent too


def test_the_stamped_size_is_the_files_own_for_any_fp32_size(int8):
    """Stamping the size can change the ratio's rounding and back (a two-cycle that once hung
    quantization): for every fp32 size the stamped figures describe the stamped file exactly."""
    from dataclasses import replace

    from edgegen.export.quantize import _stamp_sizes

    path, meta = int8
    model = onnx.load(path)
    size = model.ByteSize()
    more_digits = 0
    for fp32_size in range(4 * size, 4 * size + 3000, 7):
        figures = {"within_2_frac": 0.99}
        stamped = _stamp_sizes(model, replace(meta, extra={**meta.extra, "gates": figures}), figures, fp32_size)
        assert model.ByteSize() == figures["size_bytes"] and stamped.extra["gates"] is figures
        assert abs(figures["size_ratio_vs_fp32"] - fp32_size / figures["size_bytes"]) < 5e-4
        more_digits += round(fp32_size / figures["size_bytes"], 3) != figures["size_ratio_vs_fp32"]
    assert more_digits > 0          # the range holds sizes whose 3-decimal ratio never settles


def test_broken_calibration_is_refused(fp32, tmp_path):
    z = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32) * 0.05   # ranges far too small
    out = tmp_path / "broken.onnx"
    with pytest.raises(EdgegenError, match="int8 gate failed.*PSNR|int8 gate failed.*within") as e:
        quantize_model(fp32, out, calibration_z=z, speed_gate=False)
    assert "\n" not in str(e.value) and not out.exists()
    meta = quantize_model(fp32, out, calibration_z=z, speed_gate=False, force=True)
    g = meta.extra["gates"]
    assert out.exists() and g["passed"] is False and g["failed"]
    assert g["within_2_frac"] < 0.5


def test_fp16_is_close_and_half_size(fp32, tmp_path):
    out = tmp_path / "h.onnx"
    meta = quantize_model(fp32, out, mode="fp16")
    g = meta.extra["gates"]
    assert meta.quantization == "fp16" and g["passed"] and g["psnr_median_db"] >= 60.0
    assert g["size_ratio_vs_fp32"] >= 1.9
    m = onnx.load(out)
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer)
    assert m.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT      # fp32 I/O
    z = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    assert np.abs(_run(fp32, z).astype(int) - _run(out, z).astype(int)).max() <= 1


def test_capped_activations_are_the_int8_grid(tmp_path):
    """A generator with capped ReLUs (act_clip) exports them as Clip(0, cap); int8 folds each Clip into
    its QLinearConv's output range, so the uint8 grid of every capped activation spans [0, cap] exactly."""
    cap = 0.5                                                        # small: the tiny random net saturates it
    run, _ = make_gan_run(tmp_path, act_clip=cap)
    export_run(run, tmp_path / "c.onnx")
    src = onnx.load(tmp_path / "c.onnx")
    convs = [n.name for n in src.graph.node if n.op_type == "Conv"]
    assert sum(n.op_type == "Clip" for n in src.graph.node) == 5      # Linear + 3 up-blocks, and the pixels'
    assert layout.output_layer(src) == convs[-2:]                    # not fooled by the pixels' Clip
    meta = quantize_model(tmp_path / "c.onnx", tmp_path / "c8.onnx", force=True, speed_gate=False)
    q = onnx.load(tmp_path / "c8.onnx")
    rt = onnx_io.runtime_op_counts(q)
    assert rt["QLinearConv"] == len(convs) - 2 and rt.get("Clip", 0) == 2   # the Linear's (float) and the pixels'
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q.graph.initializer}
    scales = [float(inits[n.input[1]]) for n in q.graph.node if n.op_type == "QuantizeLinear"
              and inits[n.input[2]].dtype == np.uint8]
    assert len(scales) >= 4 and max(scales) <= cap / 255 * (1 + 1e-6)
    assert np.isclose(scales, cap / 255, rtol=1e-6).sum() >= 3
    # The Linear's int8 weights still get one scale per channel of the conv it feeds, through the Clip.
    channels = next(onnx.numpy_helper.to_array(t) for t in src.graph.initializer if t.name == next(
        n for n in src.graph.node if n.op_type == "Conv").input[1]).shape[1]
    assert sum(a.dtype == np.float16 and a.shape == (channels, 1) for a in inits.values()) == 1
    assert meta.extra["gates"]["psnr_median_db"] >= 35.0


def test_conditional_and_vae_decoder(tmp_path):
    run, _ = make_gan_run(tmp_path, num_classes=4)
    export_run(run, tmp_path / "c.onnx")
    meta = quantize_model(tmp_path / "c.onnx", tmp_path / "c8.onnx", force=True, speed_gate=False)
    assert meta.conditional and meta.extra["gates"]["runtime_ops"]["QLinearConv"] == 3   # channels-first
    vrun, _ = make_vae_run(tmp_path)
    export_run(vrun, tmp_path / "v.onnx")
    vmeta = quantize_model(tmp_path / "v.onnx", tmp_path / "v16.onnx", mode="fp16")
    assert vmeta.kind == "vae-decoder" and vmeta.extra["encoder"] == "v16.encoder.onnx"
    assert (tmp_path / "v16.encoder.onnx").read_bytes() == (tmp_path / "v.encoder.onnx").read_bytes()
    with pytest.raises(EdgegenError, match="encoder"):
        quantize_model(tmp_path / "v.encoder.onnx", tmp_path / "e8.onnx")


def test_bad_inputs(fp32, int8, tmp_path):
    out = tmp_path / "o.onnx"
    with pytest.raises(EdgegenError, match="already quantized"):
        quantize_model(int8[0], out, speed_gate=False)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(fp32.read_bytes()[:1000])
    with pytest.raises(EdgegenError, match="not a readable ONNX"):
        quantize_model(corrupt, out)
    foreign = tmp_path / "foreign.onnx"
    m = onnx.load(fp32)
    del m.metadata_props[:]
    onnx.save(m, foreign)
    with pytest.raises(EdgegenError, match="not an edgegen model"):
        quantize_model(foreign, out)
    with pytest.raises(EdgegenError, match="does not exist"):
        quantize_model(fp32, tmp_path / "missing" / "o.onnx")
    with pytest.raises(EdgegenError, match="no such model"):
        quantize_model(tmp_path / "nothing.onnx", out)
    assert not out.exists()


def test_cli_quantize_exit_codes(fp32, int8, tmp_path, capsys):
    from edgegen.cli import main

    assert main(["quantize", str(int8[0]), "--mode", "fp16", "--out", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "already quantized" in err and "\n" not in err and not (tmp_path / "x.onnx").exists()
    assert main(["quantize", str(fp32), "--mode", "fp16", "--out", str(tmp_path / "y.onnx")]) == 0
    meta = ModelMeta.from_props({p.key: p.value for p in onnx.load(tmp_path / "y.onnx").metadata_props})
    assert meta.quantization == "fp16"
