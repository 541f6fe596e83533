"""The graph variants behind the export benchmark's levers, each the model edgegen writes with one
thing changed: the split output conv joined back (``joined``), a weight zero point that sends
QLinearConv down the im2col + QGEMM path (``with_weight_zero_point``), the exact phase rewrite of
the up-blocks (``phased``), and the int8 error split into weights and activations
(``layer_sensitivity``). Used by ``export_benchmark.py``; nothing here ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def joined(model: bytes) -> bytes:
    """``model`` with its split output layer (edgegen.export.layout) joined back into one plain 2-D conv."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto.FromString(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    taps = next(n for n in g.node if n.op_type == "Conv" and n.name.endswith("_taps"))
    total = next(n for n in g.node if n.op_type == "Conv" and n.input[0] == taps.output[0])
    squeeze = next(n for n in g.node if n.input and n.input[0] == total.output[0])
    w = taps.input[1] if taps.input[1] in inits else producer[taps.input[1]].input[0]   # int8 files: fp16 + Cast
    wt = numpy_helper.to_array(inits[w]).astype(np.float32)                            # (T, C, 1, 1, 1)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in total.attribute}
    _, kh, kw = attrs["kernel_shape"]
    _, top, left, _, bottom, right = attrs["pads"]
    weight = wt.reshape(-1, kh, kw, wt.shape[1]).transpose(0, 3, 1, 2)                 # (O, C, kh, kw)
    g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), total.name + "_plain_w"))
    conv = onnx.helper.make_node("Conv", [producer[taps.input[0]].input[0], total.name + "_plain_w", *total.input[2:]],
                                 list(squeeze.output), kernel_shape=[kh, kw], pads=[top, left, bottom, right])
    nodes = [n for n in g.node if not n.name.startswith(taps.name) and n.name != total.name]
    nodes.insert(nodes.index(next(n for n in nodes if squeeze.output[0] in n.input)), conv)
    del g.node[:]
    g.node.extend(nodes)
    return m.SerializeToString()


def with_weight_zero_point(model: bytes) -> bytes:
    """``model`` with each int8 conv weight ``w`` (symmetric, zero point 0) stored as ``w - 1`` with
    zero point -1: the same function (symmetric weights are within +-127), but onnxruntime no longer
    takes its symmetric-conv kernels."""
    import onnx
    from onnx import numpy_helper

    m = onnx.ModelProto.FromString(model)
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        w = inits.get(n.input[0]) if n.op_type == "DequantizeLinear" else None
        if w is None or w.data_type != onnx.TensorProto.INT8 or len(n.input) > 2:
            continue
        q = numpy_helper.to_array(w).astype(np.int16) - 1
        w.CopyFrom(numpy_helper.from_array(q.astype(np.int8), w.name))
        scale = numpy_helper.to_array(inits[n.input[1]])
        m.graph.initializer.append(numpy_helper.from_array(np.full(scale.shape, -1, np.int8), w.name + "_zp"))
        n.input.append(w.name + "_zp")
    return m.SerializeToString()


def phased(model: bytes, single: bool = False) -> bytes:
    """``model`` with every nearest x2 Resize -> Conv3x3 -> activation rewritten exactly into its four
    output phases: phase (a, b) of the upsampled conv is a 2x2 conv on the low-resolution input (taps
    merged per axis: (w0, w1 + w2) for a = 0, (w0 + w1, w2) for a = 1), 16 instead of 36
    multiply-adds per input pixel and channel pair; the pixels change only by float rounding.

    Four convs (default): one per phase, padded on the side it reads, then Concat and DepthToSpace
    interleave them: 0.44x the up-blocks' multiply-adds. ``single``: one 2x2 conv (pad 1) with the
    four phases' filters stacked, so (N, 4 cout, s + 1, s + 1); phase (a, b) sits in DepthToSpace slot
    (1 - a, 1 - b), which puts output row 2i + a at row 2i + a + 1, so a Slice of the inner 2s x 2s
    finishes it: one conv and no Concat, for 0.44 ((s + 1) / s)^2 of the multiply-adds."""
    import onnx
    from onnx import helper, numpy_helper

    def taps(w: np.ndarray, a: int, axis: int) -> np.ndarray:
        w0, w1, w2 = (np.take(w, i, axis=axis) for i in range(3))
        return np.stack((w0, w1 + w2) if a == 0 else (w0 + w1, w2), axis=axis)

    def const(value: np.ndarray, name: str) -> str:
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    m = onnx.ModelProto.FromString(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    users = {i: n for n in g.node for i in n.input}
    nodes, done = [], set()
    for n in g.node:
        if n.name in done:
            continue
        conv = users.get(n.output[0])
        if n.op_type != "Resize" or conv is None or conv.op_type != "Conv":
            nodes.append(n)
            continue
        act = users[conv.output[0]]                                   # the Relu / Clip after the conv
        w = numpy_helper.to_array(inits[conv.input[1]])              # (O, I, 3, 3)
        if single:
            name = conv.name + "_ph"
            stacked = np.concatenate([taps(taps(w, 1 - a, 2), 1 - b, 3) for a in (0, 1) for b in (0, 1)])
            bias = [const(np.tile(numpy_helper.to_array(inits[conv.input[2]]), 4), name + "_b")] if len(conv.input) > 2 else []
            nodes += [helper.make_node("Conv", [n.input[0], const(stacked, name + "_w"), *bias], [name + "_y"],
                                       name=name, kernel_shape=[2, 2], pads=[1, 1, 1, 1]),
                      helper.make_node(act.op_type, [name + "_y", *act.input[1:]], [name + "_a"], name=name + "_act"),
                      helper.make_node("DepthToSpace", [name + "_a"], [name + "_d"], blocksize=2, mode="DCR"),
                      helper.make_node("Slice", [name + "_d", const(np.array([1, 1]), name + "_start"),
                                                 const(np.array([-1, -1]), name + "_end"), const(np.array([2, 3]), name + "_axes")],
                                       list(act.output), name=name + "_slice")]
        else:
            phases = []
            for a in (0, 1):
                for b in (0, 1):
                    name = f"{conv.name}_p{a}{b}"
                    nodes += [helper.make_node("Conv", [n.input[0], const(taps(taps(w, a, 2), b, 3), name + "_w"), *conv.input[2:]],
                                               [name + "_y"], name=name, kernel_shape=[2, 2], pads=[1 - a, 1 - b, a, b]),
                              helper.make_node(act.op_type, [name + "_y", *act.input[1:]], [name], name=name + "_act")]
                    phases.append(name)
            nodes += [helper.make_node("Concat", phases, [conv.name + "_cat"], axis=1),     # DCR order: (a, b, channel)
                      helper.make_node("DepthToSpace", [conv.name + "_cat"], list(act.output), blocksize=2, mode="DCR")]
        done |= {conv.name, act.name}
    del g.node[:]
    g.node.extend(nodes)
    return m.SerializeToString()


def layer_sensitivity(fp32: Path) -> dict:
    """Where a trained model's int8 pixel error comes from: pixels within 2/255 of fp32 for the int8
    model ``edgegen quantize`` writes, for its 8-bit weights alone (every activation Q/DQ pair
    removed, so the arithmetic between the int8-stored weights is float) and for 8-bit activations
    alone (the equalized float model with each ReLU output rounded to uint8 on its calibrated range).
    """
    import onnx

    from edgegen.export import gates, layout, onnx_io, ptq
    from edgegen.export.quantize import CALIB_N, CALIB_SEED, qdq_int8

    model, meta = onnx_io.load_model(fp32)
    z, labels = onnx_io.seeded_latents(meta, CALIB_N, CALIB_SEED)

    def within2(m) -> float:
        ref = gates.generate(model, meta, gates.GATE_N, gates.GATE_SEED)
        return gates.image_quality(ref, gates.generate(m, meta, gates.GATE_N, gates.GATE_SEED))["within_2_frac"]

    q = qdq_int8(model, meta, z, labels, layout.output_layer(model))
    # Weights only: each QuantizeLinear -> DequantizeLinear pair on an activation becomes the float
    # Clip(0, top of its uint8 range): the ReLU (or capped ReLU) the quantizer folded into it.
    inits = {t.name for t in q.graph.initializer}
    act_q = {n.output[0]: n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    weights_only = onnx.ModelProto()
    weights_only.CopyFrom(q)
    nodes = []
    for n in weights_only.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in act_q:
            q_node = act_q[n.input[0]]
            top, zero = n.output[0] + "_top", n.output[0] + "_zero"
            nodes += [onnx.helper.make_node("Constant", [], [top], value_float=255.0),
                      onnx.helper.make_node("Constant", [], [zero], value_float=0.0),
                      onnx.helper.make_node("Mul", [q_node.input[1], top], [top + "_v"]),
                      onnx.helper.make_node("Clip", [q_node.input[0], zero, top + "_v"], [n.output[0]])]
        elif n.output[0] not in act_q:
            nodes.append(n)
    del weights_only.graph.node[:]
    weights_only.graph.node.extend(nodes)
    # Activations only: uint8 rounding (zero point 0: they follow a ReLU) after each activation of the
    # float model, on its calibrated range.
    eq = ptq.equalize(model, meta, z, labels)
    relus = [n.output[0] for n in layout.activations(eq)]
    probe = onnx.ModelProto()
    probe.CopyFrom(eq)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(r) for r in relus)
    ranges = [float(a.max()) for a in onnx_io.run_batched(onnx_io.session(probe, 2), meta, z, labels, outputs=relus)]
    acts_only = onnx.ModelProto()
    acts_only.CopyFrom(eq)
    g = acts_only.graph
    for n in g.node:
        n.input[:] = [x + "_fq" if x in relus else x for x in n.input]
    nodes = []
    for n in g.node:
        nodes.append(n)
        if n.output[0] in relus:
            r = n.output[0]
            g.initializer.extend([onnx.numpy_helper.from_array(np.array(ranges[relus.index(r)] / 255, np.float32), r + "_s"),
                                  onnx.numpy_helper.from_array(np.array(0, np.uint8), r + "_zp")])
            nodes += [onnx.helper.make_node("QuantizeLinear", [r, r + "_s", r + "_zp"], [r + "_q"]),
                      onnx.helper.make_node("DequantizeLinear", [r + "_q", r + "_s", r + "_zp"], [r + "_fq"])]
    del g.node[:]
    g.node.extend(nodes)
    return {"int8": within2(q), "weights only": within2(weights_only), "activations only": within2(acts_only)}
