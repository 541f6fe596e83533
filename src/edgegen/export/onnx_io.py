"""Reading, checking, stamping and writing edgegen ONNX files (onnx + onnxruntime, no torch).

Everything that touches a ``.onnx`` file on disk goes through here, so every stage gets the same
clear one-line errors (missing, corrupt, not an edgegen model, output folder missing) and the same
guarantee: files are serialised fully in memory, checked, then written atomically, so a failure
never leaves a partial file behind.
"""

from __future__ import annotations

import collections
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from edgegen.errors import EdgegenError
from edgegen.fileio import sha256_hex, write_bytes_atomic
from edgegen.modelmeta import PREFIX, ModelMeta

MIN_OPSET = 17


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path whose folder is missing (before any expensive work); return it as Path."""
    p = Path(path)
    if not p.parent.is_dir():
        raise EdgegenError(f"{p}: the folder {p.parent} does not exist")
    if p.is_dir():
        raise EdgegenError(f"{p}: is a folder, expected an output file name")
    return p


def load_model(path: str | os.PathLike) -> tuple[onnx.ModelProto, ModelMeta]:
    """Load an edgegen ONNX file and its :class:`ModelMeta`; one clear error for any bad file."""
    p = Path(path)
    if not p.is_file():
        raise EdgegenError(f"{p}: no such model file")
    try:
        model = onnx.load_model_from_string(p.read_bytes())
    except Exception as e:  # protobuf DecodeError and friends: truncated or not ONNX at all
        raise EdgegenError(f"{p}: not a readable ONNX file ({type(e).__name__})") from None
    if len(model.graph.node) == 0:
        raise EdgegenError(f"{p}: not a readable ONNX file (empty graph)")
    return model, read_meta(model, p)


def read_meta(model: onnx.ModelProto, where: str | os.PathLike = "model") -> ModelMeta:
    """Parse the ``edgegen.*`` metadata_props of ``model``; EdgegenError if absent or malformed."""
    props = {p.key: p.value for p in model.metadata_props}
    if not any(k.startswith(PREFIX) for k in props):
        raise EdgegenError(f"{where}: not an edgegen model (no edgegen metadata)")
    try:
        return ModelMeta.from_props(props)
    except (KeyError, ValueError, TypeError) as e:
        raise EdgegenError(f"{where}: malformed edgegen metadata ({type(e).__name__}: {e})") from None


def graph_fingerprint(model: onnx.ModelProto) -> str:
    """Short SHA-256 of the serialised graph (nodes + weights; metadata excluded)."""
    return sha256_hex(model.graph.SerializeToString(deterministic=True))


def strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop exporter debug info (per-node metadata with torch stack traces, doc strings, value_info)
    and attributes that restate their operator's default (the exporter writes all eight of Resize's).

    None of it is needed to run the graph, it leaks build paths, and in an int8 file it is ~4 % of
    the bytes (the difference between 3.8x and 3.9x smaller than fp32).
    """
    opset = opset_of(model)
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        if node.domain in ("", "ai.onnx"):
            defaults = {k: v.default_value for k, v in onnx.defs.get_schema(node.op_type, opset).attributes.items()
                        if v.default_value.name}
            keep = [a for a in node.attribute if a.name not in defaults
                    or onnx.helper.get_attribute_value(a) != onnx.helper.get_attribute_value(defaults[a.name])]
            del node.attribute[:]
            node.attribute.extend(keep)
    del model.graph.value_info[:]
    model.graph.doc_string = ""
    return model


def stamp(model: onnx.ModelProto, meta: ModelMeta) -> onnx.ModelProto:
    """Replace the model's ``edgegen.*`` metadata_props by ``meta`` (other props are kept)."""
    keep = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for k, v in keep + sorted(meta.to_props().items()):
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    model.producer_name = "edgegen"
    model.producer_version = meta.version
    return model


def check_model(model: onnx.ModelProto, where: str = "model") -> None:
    """onnx.checker (full, with shape inference), opset >= 17 and only the default ``ai.onnx`` domain."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise EdgegenError(f"{where}: ONNX checker failed ({e})".splitlines()[0]) from None
    opset = {o.domain: o.version for o in model.opset_import}.get("", opset_of(model))
    if opset < MIN_OPSET:
        raise EdgegenError(f"{where}: opset {opset} < {MIN_OPSET}")
    foreign = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if foreign:
        raise EdgegenError(f"{where}: uses non-standard operator domains {foreign}")


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def remove_unused(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """``model`` without the initializers ``names`` that no node reads any more."""
    used = {x for n in model.graph.node for x in n.input}
    keep = [t for t in model.graph.initializer if t.name not in names or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Serialise ``model`` and write it atomically to ``path``; returns the size in bytes."""
    data = model.SerializeToString()
    write_bytes_atomic(path, data)
    return len(data)


def session(model: onnx.ModelProto | bytes, threads: int = 1, optimized_path: str | None = None,
            disabled_optimizers: Sequence[str] | None = None):
    """An onnxruntime CPU session with ``threads`` intra-op threads and spinning off.

    ``optimized_path`` also saves the graph as onnxruntime optimises it (fusions, QLinearConv),
    which is how op counts prove what actually runs; ``disabled_optimizers`` names onnxruntime
    graph transformers to skip: by default those the runtime skips, so gates measure what apps run.
    """
    import onnxruntime as ort

    from edgegen.runtime.generator import DISABLED_OPTIMIZERS

    if disabled_optimizers is None:
        disabled_optimizers = DISABLED_OPTIMIZERS

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path:
        so.optimized_model_filepath = optimized_path
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers))


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Operator types of the graph's top level and how often each occurs (domain-qualified if not ai.onnx)."""
    c = collections.Counter((n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type
                            for n in model.graph.node)
    return dict(sorted(c.items()))


def runtime_op_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Op counts of the graph onnxruntime actually executes after its optimisations (fusions)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        session(model, 1, optimized_path=path)
        return op_counts(onnx.load(path))


def with_extra_output(model: onnx.ModelProto, op_type: str) -> tuple[onnx.ModelProto, str]:
    """A copy of ``model`` that also outputs the last ``op_type`` node's output (e.g. the Tanh before pixels)."""
    node = next((n for n in reversed(model.graph.node) if n.op_type == op_type), None)
    if node is None:
        raise EdgegenError(f"graph has no {op_type} node to probe")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.output[0]))
    return probe, node.output[0]


def feeds(meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None) -> dict[str, np.ndarray]:
    """Input dict for a generator graph: ``z`` float32 (N, L) and, when conditional, ``label`` int64 (N,)."""
    out = {"z": np.ascontiguousarray(z, dtype=np.float32)}
    if meta.conditional:
        out["label"] = np.ascontiguousarray(labels, dtype=np.int64)
    return out


def seeded_latents(meta: ModelMeta, n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``n`` fixed N(0, I) latents (float32) and, for conditional models, labels cycling over the classes."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, meta.latent_dim)).astype(np.float32)
    labels = (np.arange(n) % len(meta.class_names)).astype(np.int64) if meta.conditional else None
    return z, labels


def run_batched(sess, meta: ModelMeta, z: np.ndarray, labels: np.ndarray | None,
                batch: int = 64, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run a generator session over ``z`` in chunks of ``batch``; concatenated outputs."""
    parts: list[list[np.ndarray]] = []
    for i in range(0, len(z), batch):
        lab = None if labels is None else labels[i:i + batch]
        parts.append(sess.run(outputs, feeds(meta, z[i:i + batch], lab)))
    return [np.concatenate([p[k] for p in parts]) for k in range(len(parts[0]))]
