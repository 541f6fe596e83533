"""Post-training refinements around the int8 quantizer, calibrated on the latent prior (no data set).

Three published steps, and GPTQ turned on the Gemm's rows (:func:`round_linear`), measured on the
shipped models in :mod:`edgegen.export.quantize`:

* Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"), before quantizing. An
  int8 activation has one scale per tensor, so a channel that spans a tenth of its tensor's range
  is rounded ten times more coarsely than it could be. Between a Gemm/Conv and the next Conv our
  generators have only ReLU, Reshape and Resize, which all commute with a positive per-channel
  scale, so dividing the producer's channel c (weights and bias) by s_c = r_c / max r (r_c its
  calibrated range) and multiplying the consumer's input channel c by s_c computes the same
  function in float, with every channel now spanning the whole uint8 range. The consumer's weights
  of the small channels shrink against the others, which costs weight precision; with GPTQ below
  that cost is small (measured: full equalization beat a per-layer trade-off of the two errors).
* GPTQ weight rounding (Frantar et al. 2023), after quantizing. Rounding each int8 Conv weight
  to its nearest grid point ignores that the errors of one output's weights add up over
  correlated inputs. GPTQ rounds the weights one input column at a time and moves the error onto
  the columns not yet rounded, weighted by the inverse of the inputs' second-moment matrix
  H = E[x x^T] (from the float model on the calibration latents), which minimises the error of
  the layer's output rather than of its weights. Same int8 grid and scales as onnxruntime's.
* Bias correction (same paper as equalization), last. Rounded weights and activations shift each
  output channel's mean by a fixed amount. Each Conv's float bias absorbs the mean error measured
  on the calibration latents, in graph order, so every step sees the corrections before it.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from edgegen.export import onnx_io
from edgegen.modelmeta import ModelMeta

_PASS_THROUGH = ("Reshape", "Resize")    # per-channel linear: commute with a channel's positive scale
ACTIVATIONS = ("Relu", "Clip")           # a generator's hidden activations: ReLU, or a capped ReLU's Clip


def boundaries(model: onnx.ModelProto, activations: tuple[str, ...] = ("Relu",)
               ) -> list[tuple[onnx.NodeProto, str, onnx.NodeProto]]:
    """``[(producer, relu_output, consumer)]``: Gemm/Conv -> Relu -> (Reshape | Resize | Unsqueeze)* -> Conv chains.

    Only chains whose producer has an initializer weight and bias, whose consumer is an ungrouped
    Conv with an initializer weight, and whose tensors have no other reader: there a per-channel
    scale can move from one layer to the next without changing the function. ``activations`` adds
    other ops in the Relu's place (a capped ReLU's ``Clip``, which a channel's scale does not pass:
    for finding which conv channel a Gemm row feeds, not for equalization).
    """
    g = model.graph
    consts = {t.name: t for t in g.initializer}
    users = _users(g)
    found = []
    for p in g.node:
        if p.op_type not in ("Gemm", "Conv") or len(p.input) < 3 or not {p.input[1], p.input[2]} <= consts.keys():
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in p.attribute}
        if p.op_type == "Gemm" and (attrs.get("transA", 0) or not attrs.get("transB", 0)):
            continue
        nxt = users[p.output[0]]
        if len(nxt) != 1 or nxt[0].op_type not in activations:
            continue
        relu = t = nxt[0].output[0]
        while len(users[t]) == 1 and _passes_channels(users[t][0], consts):
            t = users[t][0].output[0]
        c = users[t]
        if (len(c) == 1 and c[0].op_type == "Conv" and c[0].input[0] == t and c[0].input[1] in consts
                and all(a.name != "group" or a.i == 1 for a in c[0].attribute)):
            found.append((p, relu, c[0]))
    return found


def _users(graph: onnx.GraphProto) -> defaultdict[str, list[onnx.NodeProto]]:
    """Tensor name -> the nodes that read it, in graph order."""
    users = defaultdict(list)
    for n in graph.node:
        for x in n.input:
            users[x].append(n)
    return users


def _passes_channels(node: onnx.NodeProto, consts: dict[str, onnx.TensorProto]) -> bool:
    """Whether ``node`` keeps channel c at axis 1 as a function of channel c alone: a pass-through op,
    or an Unsqueeze whose axes come after the channels (the output layer's 3-D view,
    :mod:`edgegen.export.layout`)."""
    if node.op_type != "Unsqueeze":
        return node.op_type in _PASS_THROUGH
    return (len(node.input) > 1 and node.input[1] in consts
            and bool((numpy_helper.to_array(consts[node.input[1]]) >= 2).all()))


def is_plain_conv(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a 2-D Conv with stride 1, no dilation and one group (every conv of our
    generators but the output layer's 3-D ones, :mod:`edgegen.export.layout`)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    return (node.op_type == "Conv" and attrs.get("group", 1) == 1 and len(attrs.get("kernel_shape", [3, 3])) == 2
            and all(v == 1 for v in (*attrs.get("strides", []), *attrs.get("dilations", []))))


def _probed(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None,
            names: list[str], batch: int):
    """Yield, batch by batch of the calibration latents, the values of the tensors ``names``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    sess = onnx_io.session(probe, 2)
    for i in range(0, len(z), batch):
        lab = None if labels is None else labels[i:i + batch]
        yield sess.run(names, onnx_io.feeds(meta, z[i:i + batch], lab))


def _moments(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None,
             names: list[str], channels: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per channel of each tensor ``names[i]`` (viewed as (N, channels[i], -1)) over the calibration
    latents: (max, mean), accumulated batch by batch."""
    acc = [[np.full(c, -np.inf), np.zeros(c)] for c in channels]
    count = [0] * len(names)
    for values in _probed(model, meta, z, labels, names, 64):
        for k, a in enumerate(values):
            a = a.reshape(len(a), channels[k], -1).astype(np.float64)
            acc[k][0] = np.maximum(acc[k][0], a.max(axis=(0, 2)))
            acc[k][1] += a.sum(axis=(0, 2))
            count[k] += a.shape[0] * a.shape[2]
    return [(m, s1 / n) for (m, s1), n in zip(acc, count)]


def equalize(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None) -> onnx.ModelProto:
    """A copy of fp32 ``model`` with channel ranges equalized across every :func:`boundaries` chain.

    Same function in float (up to float rounding). Ranges come from running ``model`` on the
    calibration latents ``z`` (and ``labels``).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    chains = boundaries(out)
    if not chains:
        return out
    inits = {t.name: t for t in out.graph.initializer}
    arrays = {name: numpy_helper.to_array(inits[name]).astype(np.float64)
              for p, _, c in chains for name in (p.input[1], p.input[2], c.input[1])}
    stats = _moments(model, meta, z, labels, [r for _, r, _ in chains],
                     [arrays[c.input[1]].shape[1] for _, _, c in chains])
    for (p, _, c), (r, _) in zip(chains, stats):
        wp, bp, wc = arrays[p.input[1]], arrays[p.input[2]], arrays[c.input[1]]
        if wp.shape[0] % len(r) or r.max() <= 0:
            continue
        s = np.maximum(r / r.max(), 1e-6)                        # (C,); dead channels: any scale is exact
        per_row = np.repeat(s, wp.shape[0] // len(s))            # Gemm rows c*hw .. (c+1)*hw - 1 are channel c
        arrays[p.input[1]] = wp / per_row.reshape((-1,) + (1,) * (wp.ndim - 1))
        arrays[p.input[2]] = bp / per_row
        arrays[c.input[1]] = wc * s.reshape((1, -1) + (1,) * (wc.ndim - 2))   # consumer here, producer next
    for name, arr in arrays.items():
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    return out


def correct_biases(reference: onnx.ModelProto, qmodel: onnx.ModelProto, meta: ModelMeta, z: np.ndarray,
                   labels: np.ndarray | None) -> onnx.ModelProto:
    """``qmodel`` with each Conv's float bias shifted by its output's mean error against ``reference``.

    ``reference`` is the float model ``qmodel`` was quantized from (same node names); the errors are
    measured on the calibration latents, one Conv at a time in graph order.
    """
    ref_out = {n.name: n.output[0] for n in reference.graph.node if n.op_type == "Conv"}
    inits = {t.name: t for t in qmodel.graph.initializer}
    convs = [n for n in qmodel.graph.node if n.op_type == "Conv" and n.name in ref_out
             and len(n.input) > 2 and n.input[2] in inits]
    if not convs:
        return qmodel
    channels = [numpy_helper.to_array(inits[n.input[2]]).shape[0] for n in convs]
    wanted = _moments(reference, meta, z, labels, [ref_out[n.name] for n in convs], channels)
    for n, c, (_, want) in zip(convs, channels, wanted):
        ((_, got),) = _moments(qmodel, meta, z, labels, [n.output[0]], [c])
        bias = numpy_helper.to_array(inits[n.input[2]]).astype(np.float64)
        inits[n.input[2]].CopyFrom(numpy_helper.from_array((bias - (got - want)).astype(np.float32), n.input[2]))
    return qmodel


def round_weights(reference: onnx.ModelProto, qmodel: onnx.ModelProto, meta: ModelMeta, z: np.ndarray,
                  labels: np.ndarray | None, damp: float = 0.01) -> onnx.ModelProto:
    """``qmodel`` with the int8 weights of every QDQ Conv re-rounded by GPTQ (module docstring).

    ``reference`` is the float model ``qmodel`` was quantized from (same node names); its Conv
    inputs on the calibration latents give each layer's H, damped by ``damp`` times its mean
    diagonal. Stride-1, ungrouped, undilated Convs only (all of edgegen's generators); others keep
    onnxruntime's rounding.
    """
    ref = {n.name: n for n in reference.graph.node if n.op_type == "Conv"}
    ref_inits = {t.name: t for t in reference.graph.initializer}
    inits = {t.name: t for t in qmodel.graph.initializer}
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    jobs = []
    for n in qmodel.graph.node:
        dq = producer.get(n.input[1]) if n.op_type == "Conv" else None
        if (n.name not in ref or dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits
                or not is_plain_conv(n)):
            continue
        pads = next((onnx.helper.get_attribute_value(a) for a in n.attribute if a.name == "pads"), [0, 0, 0, 0])
        jobs.append((n, dq, pads))
    if not jobs:
        return qmodel
    weights = [numpy_helper.to_array(ref_inits[ref[n.name].input[1]]).astype(np.float64) for n, _, _ in jobs]
    grams = _input_grams(reference, meta, z, labels, [ref[n.name].input[0] for n, _, _ in jobs],
                         [w.shape[2:] for w in weights], [p for _, _, p in jobs])
    for (n, dq, _), w, gram in zip(jobs, weights, grams):
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)        # (O,) onnxruntime's scales
        q = _gptq(w.reshape(len(w), -1), gram, scale, damp)
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(q.reshape(w.shape), dq.input[0]))
    return qmodel


def round_linear(reference: onnx.ModelProto, qmodel: onnx.ModelProto, meta: ModelMeta, z: np.ndarray,
                 labels: np.ndarray | None, damp: float = 0.01) -> onnx.ModelProto:
    """``qmodel`` with the int8 weights of its weight-only Gemm re-rounded by GPTQ against the error at
    the output of the Conv the Gemm feeds.

    The Gemm's own output error is no guide: its input is the latent z, N(0, I), so H = I and GPTQ
    gains nothing over rounding to nearest. The next Conv, though, sums the Gemm's outputs, and
    errors it cancels cost nothing. With A the linear map from the activation (Reshape, Resize) to
    that Conv's output and d the activation's 0/1 slope (0 where the ReLU or its cap cuts),
    E|A (d * dW z)|^2 = sum over input columns j of dW[:, j]^T H dW[:, j] with
    H = (A A^T) * E[d d^T]: GPTQ along each column of the Gemm's weights, over its rows. The
    weights are those :func:`edgegen.export.quantize` stores (``<name>_q8`` int8, one float16 scale
    ``<name>_s__fp16`` per row group); ``reference`` is the float model they came from.
    """
    g = reference.graph
    inits = {t.name: t for t in g.initializer}
    qinits = {t.name: t for t in qmodel.graph.initializer}
    users, producer = _users(g), {o: n for n in g.node for o in n.output}
    for p, act_out, c in boundaries(reference, ACTIVATIONS):
        stored, scales = p.input[1] + "_q8", p.input[1] + "_s__fp16"
        if p.op_type != "Gemm" or not {stored, scales} <= qinits.keys():
            continue
        w = numpy_helper.to_array(inits[p.input[1]]).astype(np.float64)                    # (out, in)
        y = np.concatenate([v[0] for v in _probed(reference, meta, z, labels, [p.output[0]], 64)])   # (N, out)
        act = producer[act_out]                                                              # Relu or Clip
        bound = lambda k, default: (float(numpy_helper.to_array(inits[act.input[k]]))
                                    if len(act.input) > k and act.input[k] in inits else default)
        lo, hi = (0.0, np.inf) if act.op_type == "Relu" else (bound(1, -np.inf), bound(2, np.inf))
        live = ((y > lo) & (y < hi)).astype(np.float64)                                      # (N, out) slope 0/1
        a = _linear_map(reference, act_out, c, inits, users, len(w))                        # (out, M)
        if a is None:
            continue
        h = (a @ a.T) * (live.T @ live / len(live))                                          # (out, out)
        s = numpy_helper.to_array(qinits[scales]).astype(np.float64).ravel()                 # (groups,)
        q = _gptq(w.T, h, np.repeat(s, len(w) // len(s))[None, :], damp)                    # (in, out)
        qinits[stored].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(q.T).reshape(len(s), -1), stored))
    return qmodel


def _linear_map(model: onnx.ModelProto, start: str, conv: onnx.NodeProto, inits: dict, users: dict,
                width: int) -> np.ndarray | None:
    """(width, M): row i is the output of ``start`` -> (Reshape | Resize | Unsqueeze)* -> ``conv``
    (without its bias) for the i-th unit vector as ``start``, run through onnxruntime; None when an
    op of the chain reads a tensor that is not an initializer."""
    h = onnx.helper
    nodes, t = [], start
    while users[t][0] is not conv:
        nodes.append(users[t][0])
        t = nodes[-1].output[0]
    nodes.append(h.make_node("Conv", [t, conv.input[1]], ["mapped"],
                             **{a.name: h.get_attribute_value(a) for a in conv.attribute}))
    needed = {x for n in nodes for x in n.input} - {start, ""} - {o for n in nodes for o in n.output}
    if not needed <= inits.keys():
        return None
    graph = h.make_graph(nodes, "linear_map", [h.make_tensor_value_info(start, onnx.TensorProto.FLOAT, ["N", width])],
                         [h.make_empty_tensor_value_info("mapped")], [inits[x] for x in needed])
    sess = onnx_io.session(h.make_model(graph, opset_imports=model.opset_import), 2)
    eye = np.eye(width, dtype=np.float32)
    return np.concatenate([sess.run(None, {start: eye[i:i + 256]})[0].reshape(len(eye[i:i + 256]), -1)
                           for i in range(0, width, 256)]).astype(np.float64)


def _gptq(w: np.ndarray, gram: np.ndarray, scale: np.ndarray, damp: float) -> np.ndarray:
    """(O, d) float weights -> (O, d) int8 on the grid ``scale`` ((O,), or (1, d): one per column),
    rounded column by column with each column's error spread over the later columns through the
    Cholesky factor of H^-1."""
    w = w.copy()
    d = w.shape[1]
    scale = np.broadcast_to(scale.reshape(-1, 1) if scale.ndim == 1 else scale, w.shape)
    gram = gram + damp * float(np.mean(np.diag(gram)) or 1.0) * np.eye(d)
    u = np.linalg.cholesky(np.linalg.inv(gram)).T                 # upper: H^-1 = u^T u
    q = np.zeros(w.shape, dtype=np.int8)
    for i in range(d):
        qi = np.clip(np.round(w[:, i] / scale[:, i]), -127, 127)
        q[:, i] = qi
        err = (w[:, i] - qi * scale[:, i]) / u[i, i]             # (O,)
        w[:, i + 1:] -= np.outer(err, u[i, i + 1:])
    return q


def _input_grams(model: onnx.ModelProto, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None,
                 names: list[str], kernels: list[tuple[int, int]], pads: list[list[int]]) -> list[np.ndarray]:
    """For each Conv input tensor ``names[i]``: E[x x^T] over its im2col patches (C*kh*kw, C-major)."""
    grams: list[np.ndarray | float] = [0.0] * len(names)
    count = [0] * len(names)
    for values in _probed(model, meta, z, labels, names, 16):     # 16 latents: im2col stays ~30 MB
        for k, x in enumerate(values):
            cols = _im2col(x, kernels[k], pads[k])
            grams[k] = grams[k] + (cols.T @ cols).astype(np.float64)
            count[k] += len(cols)
    return [g / c for g, c in zip(grams, count)]


def _im2col(x: np.ndarray, kernel: tuple[int, int], pads: list[int]) -> np.ndarray:
    """(N, C, H, W) -> (N * H' * W', C * kh * kw) stride-1 patches, zero-padded by ``pads`` (ONNX order)."""
    kh, kw = kernel
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c, h, w = x.shape
    ho, wo = h - kh + 1, w - kw + 1
    cols = np.stack([x[:, :, i:i + ho, j:j + wo] for i in range(kh) for j in range(kw)], axis=2)   # (N, C, kh*kw, H', W')
    return cols.reshape(n, c * kh * kw, ho * wo).transpose(0, 2, 1).reshape(-1, c * kh * kw)
