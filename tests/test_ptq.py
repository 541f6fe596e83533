"""Post-training int8 refinements (edgegen.export.ptq): each step checked for what it promises.

Tiny seeded generator from test_export; calibration latents from the prior, as ``edgegen quantize``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgegen.export import export_run, layout, onnx_io, ptq
from edgegen.export.quantize import CALIB_N, CALIB_SEED, qdq_int8

from test_export import make_gan_run


@pytest.fixture(scope="module")
def fp32(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptq")
    run, _ = make_gan_run(root)
    export_run(run, root / "g.onnx")
    model, meta = onnx_io.load_model(root / "g.onnx")
    z, _ = onnx_io.seeded_latents(meta, CALIB_N, CALIB_SEED)
    return model, meta, z


def _probe(model, meta, z, names):
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return onnx_io.run_batched(onnx_io.session(probe, 1), meta, z, None, outputs=names)


def _channel_max(x, channels):
    return x.reshape(len(x), channels, -1).max(axis=(0, 2))


def test_boundaries_find_every_relu_chain(fp32):
    model, *_ = fp32
    chains = ptq.boundaries(model)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    # Linear -> conv0, conv0 -> conv1, ..., last hidden conv -> the output layer's tap conv, through
    # its Unsqueeze (edgegen.export.layout); the summing conv after the taps has no ReLU before it.
    assert [p.op_type for p, _, _ in chains] == ["Gemm"] + ["Conv"] * (len(convs) - 2)
    assert [c.name for _, _, c in chains] == convs[:-1]


def test_equalize_keeps_the_function_and_fills_every_channel(fp32):
    model, meta, z = fp32
    eq = ptq.equalize(model, meta, z, None)
    chains = ptq.boundaries(model)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    channels = [inits[c.input[1]].shape[1] for _, _, c in chains]
    names = [r for _, r, _ in chains] + [next(n.output[0] for n in model.graph.node if n.op_type == "Tanh")]
    before, after = _probe(model, meta, z, names), _probe(eq, meta, z, names)
    assert np.abs(before[-1] - after[-1]).max() < 1e-4                    # same images (tanh output)
    for a, b, c in zip(before[:-1], after[:-1], channels):
        ra, rb = _channel_max(a, c), _channel_max(b, c)
        live = ra > 1e-3 * ra.max()
        assert ra[live].min() < 0.9 * ra.max()                           # the ranges differed ...
        np.testing.assert_allclose(rb[live], ra.max(), rtol=1e-4)        # ... and now all span the largest


def test_gptq_beats_nearest_rounding_on_correlated_inputs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 24))     # (samples, d): rank-8, correlated
    w = rng.standard_normal((6, 24))
    scale = np.abs(w).max(axis=1) / 127.0
    gram = x.T @ x / len(x)
    q = ptq._gptq(w, gram, scale, damp=0.01)
    nearest = np.round(w / scale[:, None])
    assert q.dtype == np.int8 and np.abs(q.astype(int)).max() <= 127
    assert np.abs(q - nearest).max() >= 1                                  # it really re-rounds ...
    err = lambda ints: np.mean(((w - ints * scale[:, None]) @ x.T) ** 2)
    assert err(q) < 0.5 * err(nearest)                                     # ... for a smaller output error


def test_linear_rounding_targets_the_next_conv(fp32):
    """The weight-only Gemm's GPTQ rounding (round_linear) gives a smaller error at the output of the
    conv it feeds than rounding each weight to nearest on the same grid, on latents it never saw."""
    model, meta, z = fp32
    reference = ptq.equalize(model, meta, z, None)
    q = qdq_int8(model, meta, z, None, layout.output_layer(model))
    gemm = next(n for n in reference.graph.node if n.op_type == "Gemm")
    conv = next(n for n in reference.graph.node if n.op_type == "Conv")
    qi = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    w = numpy_helper.to_array(next(t for t in reference.graph.initializer if t.name == gemm.input[1]))
    rounded = qi[gemm.input[1] + "_q8"].astype(np.float64)                       # (groups, rows per group * in)
    scale = qi[gemm.input[1] + "_s_h"].astype(np.float64)                        # (groups, 1) float16
    nearest = np.clip(np.round(w.reshape(len(scale), -1) / scale), -127, 127)
    assert np.abs(rounded).max() <= 127 and np.abs(rounded - nearest).max() >= 1   # re-rounded, same grid

    def conv_error(ints):
        m = onnx.ModelProto()
        m.CopyFrom(reference)
        t = next(t for t in m.graph.initializer if t.name == gemm.input[1])
        t.CopyFrom(numpy_helper.from_array((ints * scale).reshape(w.shape).astype(np.float32), t.name))
        fresh = np.random.default_rng(7).standard_normal((256, meta.latent_dim)).astype(np.float32)
        (a,), (b,) = _probe(reference, meta, fresh, [conv.output[0]]), _probe(m, meta, fresh, [conv.output[0]])
        return float(np.mean((a - b) ** 2))

    assert conv_error(rounded) < 0.95 * conv_error(nearest)                      # measured: 0.89x


def test_refined_int8_is_on_onnxruntime_grid_and_unbiased(fp32):
    model, meta, z = fp32
    convs = [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 2]   # with a bias
    q = qdq_int8(model, meta, z, None, layout.output_layer(model))
    reference = ptq.equalize(model, meta, z, None)
    ref_out = {n.name: n.output[0] for n in reference.graph.node if n.op_type == "Conv"}
    q_out = {n.name: n.output[0] for n in q.graph.node if n.op_type == "Conv"}
    # Bias correction: every conv's output keeps the float model's mean per channel (calibration set);
    # what is left is rounding noise with no systematic part.
    for name in convs:
        (a,) = _probe(reference, meta, z, [ref_out[name]])
        (b,) = _probe(q, meta, z, [q_out[name]])
        mean_a, mean_b = (t.reshape(len(t), t.shape[1], -1).mean(axis=(0, 2)) for t in (a, b))
        assert np.abs(mean_a - mean_b).max() < 0.01 * (a - b).std()      # without it: 0.1 x the noise
    # GPTQ kept onnxruntime's symmetric int8 grid: every DequantizeLinear weight is int8 within +-127.
    ints = [numpy_helper.to_array(t) for t in q.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert ints and all(np.abs(a.astype(int)).max() <= 127 for a in ints)
