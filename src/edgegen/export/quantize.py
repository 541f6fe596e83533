"""``edgegen quantize``: int8 (static, QDQ) or fp16 copies of an exported fp32 model, behind gates.

int8 -- format and float islands chosen by measurement on this CPU (see docs/benchmarks.md):
  * QDQ format (QuantizeLinear/DequantizeLinear around float ops): standard ``ai.onnx`` ops only,
    so any runtime loads it; onnxruntime fuses each DQ -> Conv -> Q into QLinearConv at session
    start, which :func:`quantize_model` proves by counting the ops of the graph onnxruntime runs.
  * uint8 activations (per tensor, asymmetric) x int8 weights (symmetric): with symmetric weights
    QLinearConv runs MLAS's VNNI indirect-conv kernel, which beats the im2col + GEMM path (AMX-capable
    on this CPU) that weights with a zero point take (docs/benchmarks.md, export section: 0.82x at
    batch 1, about even at batch 64). Conv weights per output channel. Conv biases stay float32 in
    the file (onnxruntime makes them int32 at load; measured on 2,000 images: identical pixels for
    the GAN and VAE, at most 2/255 apart for the conditional GAN): an int32 bias needs its own
    per-channel scale beside it, twice the bytes.
  * The first layer's Linear (Gemm) is *weight-only* int8: weights stored int8 and dequantized
    in-graph, arithmetic in float. Its input is the latent z, and rounding z alone to 8 bits leaves
    only 95 % of the GAN's pixels within 2/255 (measured), while the Gemm has 0.5 % of the
    multiply-adds. One scale (float16) per channel of the feature map it feeds, not per tensor:
    equalization (below) makes its rows' magnitudes differ by channel. Its bias (the folded
    BatchNorm of 3,072 outputs) is stored in int8 too, on the same scales times one constant: a
    float vector once the session has folded its Cast and Mul.
  * The output layer (the convs after the last ReLU: width -> C channels, 0.5 % of the
    multiply-adds) stays float (its weights stored in float16): int8 there costs the most pixel
    accuracy (it feeds tanh and rounding directly) and buys no speed (C = 1 or 3 output channels
    do not fill an int8 kernel). The export has already split it into taps and a fixed summing
    conv, run as 3-D convs (:mod:`edgegen.export.layout`); an older fp32 file's plain output conv
    is split here. Tanh and the pixel arithmetic stay float.
  * Refinements (:mod:`edgegen.export.ptq`): cross-layer equalization of the channel ranges before
    quantizing, GPTQ rounding of the conv weights and bias correction after. Measured on the
    shipped models, pixels within 2/255 of fp32 (median PSNR): GAN 93.0 -> 97.2 % (46.3 -> 49.8 dB),
    conditional GAN 98.0 -> 99.2 % (50.2 -> 52.8 dB), VAE 99.3 -> 99.8 % (51.5 -> 54.0 dB). Each
    step adds: equalization alone GAN 95.5 %, conditional 98.6 %; GPTQ alone on the weights of the
    equalized GAN (activations float) 98.6 -> 99.96 %. The weight-only Gemm's weights are GPTQ-rounded
    against the error at the output of the conv it feeds (:func:`edgegen.export.ptq.round_linear`):
    GAN 97.33 -> 97.43 %, conditional 99.25 -> 99.34 %, VAE 99.78 -> 99.83 %, and on a GAN with
    capped activations, whose int8 error is mostly the Gemm's, 98.94 -> 99.15 %.
  * Calibration from the latent prior: 512 N(0, I) latents (and uniformly cycled labels), MinMax.
    No data set is needed, and the prior is exactly what the model sees at inference. Percentile
    calibration (99.98-99.999 %) was measured on the shipped models: 1-3 points more pixels within
    2/255 and 0.5-2 dB more median PSNR, but the worst image of 256 lost up to 12 dB (conditional
    GAN: 39.3 -> 26.6-32.0 dB) where clipped activations saturate. MinMax never ruins an image.
fp16 -- every float weight stored as float16 and cast back to float32 in-graph (``Cast`` of a
  constant, which onnxruntime folds at load): half the size, fp32 I/O and fp32 arithmetic.

Gates (vs the fp32 model, :mod:`edgegen.export.gates`): int8 median PSNR >= 35 dB, >= 99 % of pixels
within 2/255, FCD change <= 5 % when measurable, faster than fp32 at batch 64; fp16 median PSNR
>= 60 dB. A failing model is not written unless ``force``; the figures go into its metadata.
Measured on the shipped models: all three pass every gate. A GAN with plain ReLUs does not: its
8-bit activations between the convolutions leave 97.62 +- 0.19 % of pixels within 2/255 (seeds 0-2).
The cause is the ReLUs' rare peaks (10-13x their RMS), which set each activation's uint8 range;
GANs now cap their ReLUs during training (``--act-clip``, default 3), which fixes that range at
[0, 3]: 99.31 +- 0.02 % over seeds 0-2, at FCD 8.58 +- 0.34 against 8.40 +- 0.15 with plain ReLUs
(docs/benchmarks.md, seed spread). Measured on the plain-ReLU GAN and not kept: clipping the
calibrated ranges after training (0.9x MinMax: 97.1 %, worst image 39 dB; 0.8x: 95.3 %; per
activation, 0.5-0.9x: at most 97.6 %), quantization-aware fine-tuning of the int8 weights and
biases against the fp32 model (straight-through rounding, 200 Adam steps of 64: 97.1-97.2 %), and
fine-tuning the float generator against its own simulated uint8 activations (400-600 Adam steps:
97.3 %). Adding the cap to the trained model by
800 more GAN steps, instead of training with it, left its FCD worse (2,000 samples: 9.19 vs 8.94).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgegen.errors import EdgegenError
from edgegen.export import gates, layout, onnx_io, ptq
from edgegen.fileio import write_bytes_atomic
from edgegen.modelmeta import ModelMeta

INT8_PSNR_DB, INT8_WITHIN2, FCD_MAX_REL, FP16_PSNR_DB = 35.0, 0.99, 0.05, 60.0
CALIB_N, CALIB_SEED, CALIB_BATCH = 512, 0, 64
SPEED_BATCH = 64
QUANT_OPS = ["Conv", "MatMul", "Relu", "Clip", "Resize", "Reshape", "DepthToSpace"]   # Gemm: weight-only, below


def quantize_model(in_path: str | os.PathLike, out_path: str | os.PathLike, mode: str = "int8",
                   force: bool = False, *, speed_gate: bool = True, calibration_z: np.ndarray | None = None,
                   calibration_labels: np.ndarray | None = None, threads: int = 2) -> ModelMeta:
    """Write an int8 or fp16 copy of the fp32 edgegen model ``in_path`` to ``out_path``; return its metadata.

    ``calibration_z`` (N, latent) and ``calibration_labels`` replace the default prior samples
    (for experiments and for testing that the gates catch a bad calibration). ``speed_gate=False``
    skips the timing (tests must not depend on timing); ``force`` writes even when a gate fails.
    A VAE decoder's ``<stem>.encoder.onnx`` is copied beside the output unchanged (fp32). Raises
    :class:`EdgegenError` for bad input (missing/corrupt/non-edgegen/already-quantized model,
    encoder files, missing output folder) and for failed gates without ``force``.
    """
    if mode not in ("int8", "fp16"):
        raise EdgegenError(f"unknown quantization mode {mode!r} (int8 or fp16)")
    out = onnx_io.check_output_path(out_path)
    src = Path(in_path)
    model, meta = onnx_io.load_model(src)
    if meta.quantization != "fp32" or any(n.op_type in ("QuantizeLinear", "DequantizeLinear")
                                          for n in model.graph.node):
        raise EdgegenError(f"{src}: already quantized ({meta.quantization}); quantize the fp32 export instead")
    if meta.kind == "vae-encoder":
        raise EdgegenError(f"{src}: is a VAE encoder; quantize the decoder (its encoder is copied beside it)")
    if out.resolve() == src.resolve():
        raise EdgegenError(f"{out}: output would overwrite the input model")

    if mode == "int8":
        qmodel, figures = _int8(model, meta, calibration_z, calibration_labels)
    else:
        qmodel, figures = _fp16(model), {}
    onnx_io.check_model(qmodel, f"{mode} model")

    # Gates, measured on what will be written.
    quality = gates.image_quality(gates.generate(model, meta, gates.GATE_N, gates.GATE_SEED),
                                  gates.generate(qmodel, meta, gates.GATE_N, gates.GATE_SEED))
    figures.update(quality)
    failed = []
    if mode == "int8":
        if quality["psnr_median_db"] < INT8_PSNR_DB:
            failed.append(f"median PSNR {quality['psnr_median_db']:.1f} dB < {INT8_PSNR_DB:.0f}")
        if quality["within_2_frac"] < INT8_WITHIN2:
            failed.append(f"{100 * quality['within_2_frac']:.2f} % of pixels within 2/255 < {100 * INT8_WITHIN2:.0f} %")
        fcd = gates.fcd_change(meta, model, qmodel)
        figures.update(fcd)
        if "fcd_change_rel" in fcd and fcd["fcd_change_rel"] > FCD_MAX_REL:
            failed.append(f"FCD +{100 * fcd['fcd_change_rel']:.1f} % > {100 * FCD_MAX_REL:.0f} %")
        if speed_gate:
            fp32_ips = gates.throughput(model, meta, SPEED_BATCH, threads)
            int8_ips = gates.throughput(qmodel, meta, SPEED_BATCH, threads)
            figures.update({"fp32_img_s_b64": round(fp32_ips, 1), "int8_img_s_b64": round(int8_ips, 1),
                            "speed_threads": threads})
            if int8_ips <= fp32_ips:
                failed.append(f"int8 not faster than fp32 at batch {SPEED_BATCH} ({int8_ips:.0f} vs {fp32_ips:.0f} img/s)")
        else:
            figures["speed"] = "not measured"
    elif quality["psnr_median_db"] < FP16_PSNR_DB:
        failed.append(f"median PSNR {quality['psnr_median_db']:.1f} dB < {FP16_PSNR_DB:.0f}")

    figures["passed"] = not failed
    if failed:
        figures["failed"] = failed
    if failed and not force:
        raise EdgegenError(f"{src}: {mode} gate failed ({'; '.join(failed)}); nothing written (use --force to keep it)")

    extra = {**meta.extra, "gates": figures, "quantized_from": meta.model_fingerprint}
    encoder = src.with_name(src.stem + ".encoder.onnx")
    out_encoder = out.with_name(out.stem + ".encoder.onnx")
    if meta.kind == "vae-decoder" and encoder.is_file():
        extra["encoder"] = out_encoder.name
    qmeta = _stamp_sizes(qmodel, replace(meta, quantization=mode, model_fingerprint=onnx_io.graph_fingerprint(qmodel),
                                         extra=extra), figures, src.stat().st_size)
    if meta.kind == "vae-decoder" and encoder.is_file() and out_encoder.resolve() != encoder.resolve():
        write_bytes_atomic(out_encoder, encoder.read_bytes())      # before the decoder that names it
    onnx_io.write_model(qmodel, out)
    return qmeta


def _stamp_sizes(model: onnx.ModelProto, meta: ModelMeta, figures: dict, fp32_size: int) -> ModelMeta:
    """Stamp ``meta`` into ``model`` with ``figures`` (its gates, part of ``meta.extra``) holding the
    stamped file's own size and its ratio to ``fp32_size``; returns the stamped metadata.

    Writing the figures changes the size by a digit or two, which can change the rounded ratio's
    length back: a two-cycle. A fixed point is then found with one more decimal of the ratio.
    """
    for digits in (3, 4, 5, 6):
        for _ in range(3):
            size = onnx_io.stamp(model, meta).ByteSize()
            if figures.get("size_bytes") == size:
                return meta
            figures["size_bytes"], figures["size_ratio_vs_fp32"] = size, round(fp32_size / size, digits)
    raise EdgegenError("could not stamp the file's own size into its metadata")   # never seen


# ----------------------------------------------------------------------------- int8


class _PriorReader:
    """onnxruntime CalibrationDataReader over latents (and labels) in batches of 64."""

    def __init__(self, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None):
        self._batches = iter([onnx_io.feeds(meta, z[i:i + CALIB_BATCH], None if labels is None
                                            else labels[i:i + CALIB_BATCH]) for i in range(0, len(z), CALIB_BATCH)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # part of the reader protocol; MinMax reads once
        pass


def _int8(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray | None,
          labels: np.ndarray | None) -> tuple[onnx.ModelProto, dict]:
    """Static QDQ int8 quantization calibrated on the latent prior; returns (model, op-count figures)."""
    if z is None:
        z, labels = onnx_io.seeded_latents(meta, CALIB_N, CALIB_SEED)
        if labels is not None:   # cycle labels in a shuffled order so every batch sees every class
            labels = np.random.default_rng(CALIB_SEED).permutation(labels)
    z = np.asarray(z, dtype=np.float32)
    if z.ndim != 2 or z.shape[1] != meta.latent_dim:
        raise EdgegenError(f"calibration latents must be (N, {meta.latent_dim}), got {z.shape}")
    if meta.conditional and labels is None:
        raise EdgegenError("conditional model: calibration needs labels")
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    float_nodes = layout.output_layer(model)                            # the output conv(s) stay float
    qmodel = qdq_int8(model, meta, z, labels, float_nodes)

    # Prove the convolutions run as int8 kernels: count the ops onnxruntime executes after fusion.
    runtime = onnx_io.runtime_op_counts(qmodel)
    n_int8 = len(convs) - len(float_nodes)
    n_qconv = runtime.get("com.microsoft.QLinearConv", 0) + runtime.get("QLinearConv", 0)
    if n_qconv != n_int8:
        raise EdgegenError(f"int8 model runs {n_qconv} QLinearConv for {n_int8} quantized convolutions "
                           f"(onnxruntime did not fuse the QDQ pattern); runtime ops: {runtime}")
    return qmodel, {"format": "QDQ", "activations": "uint8 per-tensor", "weights": "int8 symmetric, per-channel convs",
                    "linear": "weight-only int8 per channel, float arithmetic",
                    "float_nodes": float_nodes, "calibration": f"{len(z)} latents, MinMax",
                    "refinements": "cross-layer equalization, GPTQ rounding, bias correction",
                    "runtime_ops": runtime}


def qdq_int8(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None,
             float_nodes: list[str]) -> onnx.ModelProto:
    """``model`` with every layer but ``float_nodes`` in QDQ int8, calibrated on ``z`` (and ``labels``).

    The settings of :func:`quantize_model` (see the module docstring): cross-layer equalization,
    onnxruntime's static quantizer, weight-only int8 Gemms, GPTQ weight rounding, bias correction;
    metadata and debug names stripped. Also used by the export benchmark to quantize one layer at
    a time.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    reader = type("Reader", (_PriorReader, CalibrationDataReader), {})(meta, z, labels)
    model = ptq.equalize(model, meta, z, labels)
    inits = {t.name: t for t in model.graph.initializer}
    # A Gemm feeding a Conv gets one weight scale per channel of that Conv's input (its rows c*hw ..).
    groups = {p.input[1]: numpy_helper.to_array(inits[c.input[1]]).shape[1]
              for p, _, c in ptq.boundaries(model, ptq.ACTIVATIONS) if p.op_type == "Gemm"}
    reference = model
    linear = [n for n in model.graph.node if n.op_type == "Gemm"]           # weight-only (module docstring)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        onnx.save(model, src)
        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR   # onnxruntime logs a pre-processing hint as a warning
        try:
            quantize_static(src, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=QUANT_OPS, nodes_to_exclude=float_nodes,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False,
                                           "QuantizeBias": False})
        except Exception as e:
            raise EdgegenError(f"int8 quantization failed ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        finally:
            root.setLevel(level)
        qmodel = onnx.load(dst)
    del qmodel.metadata_props[:]                                          # restamped by the caller
    onnx_io.strip_debug_info(qmodel)
    stored = {t.name for t in qmodel.graph.initializer}
    int8_linear = {n.input[1]: (groups.get(n.input[1], 1), n.input[2] if len(n.input) > 2 and n.input[2] in stored
                                else None) for n in linear if n.name not in float_nodes and n.input[1] in stored}
    qmodel = _int8_weights(qmodel, int8_linear)
    qmodel = layout.split_output_conv(qmodel, float_nodes)             # fp32 files edgegen wrote before it split
    # The float convs' weights (the only Conv weights still initializers) and the Gemm scales are
    # stored in float16; their arithmetic stays float32.
    stored = {t.name for t in qmodel.graph.initializer}
    qmodel = _fp16(qmodel, {n.input[1] for n in qmodel.graph.node if n.op_type == "Conv" and n.input[1] in stored}
                   | {name + "_s" for name in int8_linear})
    qmodel = ptq.round_weights(reference, qmodel, meta, z, labels)
    qmodel = ptq.round_linear(reference, qmodel, meta, z, labels)
    qmodel = ptq.correct_biases(reference, qmodel, meta, z, labels)
    return _short_names(_drop_zero_points(qmodel))


def _drop_zero_points(model: onnx.ModelProto) -> onnx.ModelProto:
    """Remove the all-zero int8/int32 zero points of weight and bias ``DequantizeLinear`` nodes.

    The input is optional and defaults to 0 for those types, so the graph computes the same; it
    saves 4 bytes per output channel of every bias (onnxruntime fuses QLinearConv either way).
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dropped = set()
    for n in g.node:
        if n.op_type == "DequantizeLinear" and len(n.input) == 3 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            if zp.dtype in (np.int8, np.int32) and not zp.any():
                dropped.add(n.input[2])
                del n.input[2]
    return onnx_io.remove_unused(model, dropped)


def _int8_weights(model: onnx.ModelProto, linear: dict[str, tuple[int, str | None]]) -> onnx.ModelProto:
    """``model`` with each float weight ``name`` of ``linear`` stored as int8 (symmetric, one scale per
    group of consecutive rows: ``linear[name] = (groups, bias)``) and turned back into float at the
    top of the graph by ``Cast``, ``Mul`` and ``Reshape`` (weight-only int8).

    The bias, when named, is stored in int8 on the same groups' scales times one constant ``k``
    (the smallest that keeps every group's biases within +-127 steps): no second set of scales.
    Not ``DequantizeLinear``: onnxruntime keeps that node (it is part of its QDQ patterns) and would
    dequantize the weights on every run (measured: 11 % slower at batch 1), whereas it folds these
    ops of constants into a float weight once, when the session opens.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    h = onnx.helper
    dq = []

    def stored_int8(name: str, q: np.ndarray, scale: str, shape: tuple[int, ...]) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(q.astype(np.int8), name + "_q8"))
        g.initializer.append(numpy_helper.from_array(np.array(shape, np.int64), name + "_shape"))
        dq.extend([h.make_node("Cast", [name + "_q8"], [name + "_f"], to=onnx.TensorProto.FLOAT),
                   h.make_node("Mul", [name + "_f", scale], [name + "_g"]),
                   h.make_node("Reshape", [name + "_g", name + "_shape"], [name])])

    for name, (k, bias) in linear.items():
        w = numpy_helper.to_array(inits[name])
        rows = w.reshape(k, -1)                                                   # (groups, rows per group * in)
        scale = (np.maximum(np.abs(rows).max(axis=1, keepdims=True), 1e-12) / 127.0).astype(np.float32)
        g.initializer.append(numpy_helper.from_array(scale, name + "_s"))
        stored_int8(name, np.clip(np.round(rows / scale), -127, 127), name + "_s", w.shape)
        if bias is not None:
            b = numpy_helper.to_array(inits[bias]).reshape(k, -1)                 # (groups, rows per group)
            factor = np.float32(max(float((np.abs(b) / scale).max()) / 127.0, 1e-12))
            g.initializer.append(numpy_helper.from_array(factor, bias + "_k"))
            dq.append(h.make_node("Mul", [name + "_s", bias + "_k"], [bias + "_s"]))
            stored_int8(bias, np.clip(np.round(b / (scale * factor)), -127, 127), bias + "_s", (b.size,))
    nodes = dq + list(g.node)                                                 # topological order holds
    del g.node[:]
    g.node.extend(nodes)
    return model


# quantize_static's name suffixes -> short ones ("relu_1_QuantizeLinear_Output" -> "relu_1_q"), and the
# torch exporter's longest names ("upsample_nearest2d_1" -> "up_1", "g.blocks.0.conv.weight" ->
# "b0.weight"): 4 kB of a 330 kB file, all in names.
_SUFFIXES = [("_DequantizeLinear_Output", "_dq"), ("_QuantizeLinear_Output", "_q"), ("_DequantizeLinear", "_dq"),
             ("_QuantizeLinear", "_q"), ("_quantized", "_q8"), ("_zero_point", "_zp"), ("_scale", "_s"),
             ("upsample_nearest2d", "up"), ("g.blocks.", "b"), (".conv.", "."), ("__to_fp32", "_c"), ("__fp16", "_h")]


def _short_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rename the quantizer's tensors and nodes with short names, if the renaming stays one-to-one."""
    def short(name: str) -> str:
        for old, new in _SUFFIXES:
            name = name.replace(old, new)
        return name

    g = model.graph
    names = {t.name for t in g.initializer} | {x for n in g.node for x in (*n.input, *n.output)}
    names -= {v.name for v in (*g.input, *g.output)} | {""}
    rename = {x: short(x) for x in names}
    if len(set(rename.values())) != len(rename) or set(rename.values()) & {v.name for v in (*g.input, *g.output)}:
        return model
    for t in g.initializer:
        t.name = rename[t.name]
    for n in g.node:
        n.name = short(n.name)
        for field in (n.input, n.output):
            field[:] = [rename.get(x, x) for x in field]
    return model


# ----------------------------------------------------------------------------- fp16


def _fp16(model: onnx.ModelProto, names: set[str] | None = None) -> onnx.ModelProto:
    """Store every float32 initializer (or those in ``names``) as float16 plus a ``Cast`` back to float32
    (same tensor name); metadata is dropped (restamped by the caller)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.metadata_props[:]
    casts, keep = [], []
    for init in m.graph.initializer:
        if (init.data_type != onnx.TensorProto.FLOAT or int(np.prod(init.dims)) < 16
                or (names is not None and init.name not in names)):
            keep.append(init)                # scalars (127.5, clip bounds) stay: nothing to gain
            continue
        arr = numpy_helper.to_array(init)
        if np.abs(arr).max(initial=0.0) > 65504.0:
            raise EdgegenError(f"weight {init.name} exceeds the float16 range")
        half = numpy_helper.from_array(arr.astype(np.float16), init.name + "__fp16")
        keep.append(half)
        casts.append(onnx.helper.make_node("Cast", [half.name], [init.name], to=onnx.TensorProto.FLOAT,
                                           name=init.name + "__to_fp32"))
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    nodes = casts + list(m.graph.node)       # casts first: topological order holds
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m
