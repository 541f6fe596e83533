"""`Generator`: an exported edgegen model behind a small numpy API (onnxruntime, never torch).

The ONNX file describes itself (:mod:`edgegen.modelmeta`): ``z`` float32 (N, latent) [+ ``label``
int64 (N,)] -> ``image`` uint8 (N, H, W, C). So the runtime does no pre- or post-processing: it
derives latents from ``(seed, index)`` (:mod:`edgegen.runtime.latent`), feeds them, and returns
the pixels. VAE models keep their encoder in ``<stem>.encoder.onnx`` beside the decoder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from edgegen.errors import EdgegenError
from edgegen.fileio import sha256_hex
from edgegen.modelmeta import ModelMeta
from edgegen.runtime.latent import check_seed, latents, slerp

MODES = ("desktop", "batch")
# onnxruntime's NHWC transformer moves int8 convolutions to channels-last, and with them the uint8
# Resize between them, whose channels-last kernel is slow (profiled: 34-42 % of an int8 generator's
# time). Without it our int8 generators run 12-27 % faster (two sessions timed alternately: export
# benchmark's layout lever, and the shipped GAN); float models are unaffected. Every edgegen session
# skips it.
DISABLED_OPTIMIZERS = ("NhwcTransformer",)
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "models"


def cpu_count() -> int:
    """CPUs this process may run on (affinity-aware; containers often pin fewer than os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def session_options(mode: str = "desktop", threads: int | None = None) -> ort.SessionOptions:
    """onnxruntime options for a use: ``desktop`` (1–2 threads, no spinning) or ``batch`` (all cores).

    Desktop apps call the model now and then; onnxruntime's worker threads spin-wait after each
    run by default, which shows as idle CPU use, so spinning is turned off and the pool kept small.
    Batch jobs keep the default spinning (lower latency between back-to-back runs) on every core.
    """
    if mode not in MODES:
        raise EdgegenError(f"unknown session mode {mode!r} (expected one of {', '.join(MODES)})")
    if threads is not None and threads < 1:
        raise EdgegenError(f"threads must be >= 1, got {threads}")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: no optimizer chatter in an app's stderr
    if mode == "desktop":
        so.intra_op_num_threads = threads or min(2, cpu_count())
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
    else:
        so.intra_op_num_threads = threads or cpu_count()
    return so


def default_model_path(name: str = "gan") -> Path:
    """Path of a model bundled in ``edgegen/assets/models`` (``<name>.int8.onnx`` or ``<name>.onnx``).

    The pretrained defaults are shipped by the pretrained-models work; until then (or in a build
    without them) this raises a clear :class:`EdgegenError` naming what is available.
    """
    for cand in (ASSETS / f"{name}.int8.onnx", ASSETS / f"{name}.onnx"):
        if cand.is_file():
            return cand
    have = sorted({p.name.split(".")[0] for p in ASSETS.glob("*.onnx") if ".encoder." not in p.name}) if ASSETS.is_dir() else []
    hint = f"bundled: {', '.join(have)}" if have else "this installation bundles no pretrained models"
    raise EdgegenError(f"no bundled model named {name!r} ({hint}); pass a model file instead")


def encoder_path_for(path: Path) -> Path | None:
    """The VAE encoder beside a decoder: ``<stem>.encoder.onnx``, also for ``<stem>.int8.onnx`` files."""
    stem = path.name[:-5] if path.name.endswith(".onnx") else path.name
    cands = [path.with_name(f"{stem}.encoder.onnx")]
    for q in (".int8", ".fp16", ".fp32"):
        if stem.endswith(q):
            base = stem[: -len(q)]
            cands += [path.with_name(f"{base}.encoder{q}.onnx"), path.with_name(f"{base}.encoder.onnx")]
    return next((c for c in cands if c.is_file()), None)


def _open_session(data: bytes, name: str, so: ort.SessionOptions) -> tuple[ort.InferenceSession, ModelMeta]:
    """Session + parsed metadata for ONNX ``data``; one clear error for anything unreadable."""
    try:
        sess = ort.InferenceSession(data, sess_options=so, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=list(DISABLED_OPTIMIZERS))
    except Exception as e:  # onnxruntime raises several types (Fail, InvalidProtobuf, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgegenError(f"{name}: not a readable ONNX model ({first[:200]})") from None
    props = sess.get_modelmeta().custom_metadata_map
    if "edgegen.kind" not in props:
        raise EdgegenError(f"{name}: not an edgegen model (no edgegen metadata; export it with `edgegen export`)")
    try:
        meta = ModelMeta.from_props(props)
    except (KeyError, ValueError, TypeError) as e:
        raise EdgegenError(f"{name}: malformed edgegen metadata ({e})") from None
    return sess, meta


def _check_io(sess: ort.InferenceSession, meta: ModelMeta, name: str, inputs: set[str], outputs: set[str]) -> None:
    have_in = {i.name for i in sess.get_inputs()}
    have_out = {o.name for o in sess.get_outputs()}
    if have_in != inputs or not outputs <= have_out:
        raise EdgegenError(f"{name}: graph inputs {sorted(have_in)} / outputs {sorted(have_out)} do not match "
                           f"the edgegen {meta.kind} contract (inputs {sorted(inputs)}, outputs {sorted(outputs)})")


def _shape_text(shape: Sequence) -> str:
    return "(" + ", ".join("N" if d is None or isinstance(d, str) else str(d) for d in shape) + ")"


def _check_image_output(sess: ort.InferenceSession, meta: ModelMeta, name: str) -> None:
    """Refuse a graph whose declared ``image`` output is not the uint8 (N, H, W, C) its metadata promises.

    Dims the graph leaves symbolic (or a shape it does not declare) are checked on the first
    real output instead (:meth:`Generator.run`).
    """
    out = next(o for o in sess.get_outputs() if o.name == "image")
    shape = list(out.shape or [])
    want = ("N", *meta.image_shape)
    bad_shape = bool(shape) and (len(shape) != 4 or any(
        isinstance(d, int) and d != w for d, w in zip(shape[1:], meta.image_shape)))
    if out.type != "tensor(uint8)" or bad_shape:
        dtype = out.type.removeprefix("tensor(").removesuffix(")")
        declared = _shape_text(shape) if shape else "(shape not declared)"
        raise EdgegenError(f"{name}: graph output image is {dtype} {declared} "
                           f"but its edgegen metadata promises uint8 {_shape_text(want)}; "
                           "the file does not match its metadata (re-export it with `edgegen export`)")


class Generator:
    """A loaded generator: ``generate``, ``interpolate`` and, for VAEs, ``encode/decode/reconstruct``.

    Calls from several threads are safe (onnxruntime sessions allow concurrent ``run``); a
    session cannot be pickled, so each worker process (e.g. a Ray actor) loads its own.
    """

    def __init__(self, session: ort.InferenceSession, meta: ModelMeta, name: str, fingerprint: str,
                 encoder: ort.InferenceSession | None = None, mode: str = "desktop", threads: int = 1):
        self.session, self.meta, self.name, self.fingerprint = session, meta, name, fingerprint
        self.encoder, self.mode, self.threads = encoder, mode, threads

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None, mode: str = "desktop",
             encoder: str | os.PathLike | None = None) -> "Generator":
        """Open an edgegen ONNX model (GAN or VAE decoder) and check it can be served.

        Refuses, with a clear :class:`EdgegenError`: a missing or unreadable file, an ONNX file
        without edgegen metadata, a VAE *encoder* passed as the model, and graphs whose inputs,
        outputs or pixel format differ from the contract. For VAE decoders the encoder is looked
        up beside the file (``<stem>.encoder.onnx``) unless ``encoder`` names it; a missing encoder
        only disables ``encode``/``reconstruct``.
        """
        p = Path(path)
        if not p.is_file():
            raise EdgegenError(f"{p}: no such model file")
        data = p.read_bytes()
        enc_path = Path(encoder) if encoder is not None else None
        if enc_path is not None and not enc_path.is_file():
            raise EdgegenError(f"{enc_path}: no such encoder file")
        gen = cls.from_bytes(data, name=str(p), threads=threads, mode=mode)
        if gen.meta.kind == "vae-decoder":
            enc_path = enc_path or encoder_path_for(p)
            if enc_path is not None:
                gen.attach_encoder(enc_path.read_bytes(), str(enc_path))
        return gen

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<model>", threads: int | None = None,
                   mode: str = "desktop") -> "Generator":
        """Like :meth:`load` from in-memory ONNX bytes (used by Ray actors: ship bytes, not paths)."""
        so = session_options(mode, threads)
        sess, meta = _open_session(data, name, so)
        if meta.kind == "vae-encoder":
            raise EdgegenError(f"{name}: this is a VAE encoder; load the decoder file "
                               "(the encoder is picked up beside it as <stem>.encoder.onnx)")
        if meta.output_dtype != "uint8" or meta.output_layout != "NHWC":
            raise EdgegenError(f"{name}: outputs {meta.output_dtype} {meta.output_layout}; this runtime serves "
                               "uint8 NHWC pixels only (re-export with a current edgegen)")
        if meta.conditional and not meta.class_names:
            raise EdgegenError(f"{name}: conditional model without class names in its metadata")
        _check_io(sess, meta, name, {"z", "label"} if meta.conditional else {"z"}, {"image"})
        _check_image_output(sess, meta, name)
        z_dim = sess.get_inputs()[[i.name for i in sess.get_inputs()].index("z")].shape[-1]
        if isinstance(z_dim, int) and z_dim != meta.latent_dim:
            raise EdgegenError(f"{name}: input z has {z_dim} columns but metadata says latent_dim={meta.latent_dim}")
        return cls(sess, meta, name, sha256_hex(data), mode=mode, threads=so.intra_op_num_threads)

    def attach_encoder(self, data: bytes, name: str = "<encoder>") -> None:
        """Attach a VAE encoder (ONNX bytes) after checking it belongs with this decoder."""
        sess, meta = _open_session(data, name, session_options(self.mode, self.threads))
        if meta.kind != "vae-encoder":
            raise EdgegenError(f"{name}: expected a VAE encoder, found kind {meta.kind!r}")
        if (meta.latent_dim, meta.image_shape, meta.conditional) != (
                self.meta.latent_dim, self.meta.image_shape, self.meta.conditional):
            raise EdgegenError(f"{name}: encoder does not match the decoder {self.name} (latent/image/conditional)")
        _check_io(sess, meta, name, {"image", "label"} if meta.conditional else {"image"}, {"mean", "logvar"})
        self.encoder = sess

    # ------------------------------------------------------------------ labels

    @property
    def num_classes(self) -> int:
        return len(self.meta.class_names) if self.meta.conditional else 0

    def class_index(self, cls: str | int) -> int:
        """Resolve a class given by name (case-insensitive) or index; clear error when unknown."""
        names = self.meta.class_names
        if not self.meta.conditional:
            raise EdgegenError(f"{self.name}: unconditional model; it takes no class")
        if isinstance(cls, str) and not cls.strip().lstrip("-").isdigit():
            lower = [c.lower() for c in names]
            if cls.lower() not in lower:
                raise EdgegenError(f"unknown class {cls!r}; this model knows: {', '.join(names)}")
            return lower.index(cls.lower())
        idx = int(cls)
        if not 0 <= idx < len(names):
            raise EdgegenError(f"class index {idx} out of range 0..{len(names) - 1}")
        return idx

    def labels_for(self, indices: np.ndarray, labels: int | str | Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        """(N,) int64 labels for images ``indices``: ``None`` cycles classes by index (balanced and
        reproducible); an int or class name fixes one class; an array gives one label per image."""
        n = len(indices)
        if not self.meta.conditional:
            if labels is not None:
                raise EdgegenError(f"{self.name}: unconditional model; labels must be None")
            return None
        if labels is None:
            return (np.asarray(indices, dtype=np.int64) % self.num_classes).astype(np.int64)
        if isinstance(labels, (str, int, np.integer)):
            return np.full(n, self.class_index(labels), dtype=np.int64)
        arr = np.asarray(labels)
        if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer):
            raise EdgegenError(f"labels must be {n} integers, got shape {arr.shape} dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= self.num_classes):
            raise EdgegenError(f"label out of range 0..{self.num_classes - 1}")
        return arr.astype(np.int64)

    # ------------------------------------------------------------------ generation

    def run(self, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """One forward pass: z (N, latent) float32 [+ labels (N,) int64] -> (N, H, W, C) uint8."""
        z = np.ascontiguousarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != self.meta.latent_dim:
            raise EdgegenError(f"z must have shape (N, {self.meta.latent_dim}), got {z.shape}")
        feeds = {"z": z}
        if self.meta.conditional:
            if labels is None or len(labels) != len(z):
                raise EdgegenError("conditional model: one label per latent is required")
            feeds["label"] = np.ascontiguousarray(labels, dtype=np.int64)
        images = self.session.run(["image"], feeds)[0]
        want = (len(z), *self.meta.image_shape)
        if images.dtype != np.uint8 or images.shape != want:     # the graph broke its metadata's promise
            raise EdgegenError(f"{self.name}: the model returned {images.dtype} {images.shape} for {len(z)} latents "
                               f"but its edgegen metadata promises uint8 {want}; the file does not match its "
                               "metadata (re-export it with `edgegen export`)")
        return images

    def images_for(self, seed: int, indices: np.ndarray, labels: np.ndarray | None = None,
                   batch_size: int = 64) -> np.ndarray:
        """Images for arbitrary image ``indices`` of ``seed`` (labels already resolved, (N,) or None)."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), *self.meta.image_shape), dtype=np.uint8)   # (N, H, W, C)
        for s in range(0, len(indices), batch_size):
            sl = slice(s, s + batch_size)
            z = latents(seed, indices[sl], self.meta.latent_dim)                 # (b, latent)
            out[sl] = self.run(z, None if labels is None else labels[sl])
        return out

    def generate(self, n: int, seed: int = 0, labels: int | str | Sequence[int] | np.ndarray | None = None,
                 batch_size: int = 64, start: int = 0) -> np.ndarray:
        """``n`` images (N, H, W, C) uint8: image ``i`` comes from latent ``(seed, start + i)``.

        The same seed gives the same pixels whatever ``batch_size`` or thread count, because every
        latent is computed from its own index (counter-based) rather than drawn from a stream.
        ``labels`` (conditional models): None cycles the classes, a class name/index fixes one,
        an array gives one per image.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise EdgegenError(f"n must be a positive integer, got {n!r}")
        if batch_size < 1:
            raise EdgegenError(f"batch_size must be >= 1, got {batch_size}")
        check_seed(seed)
        idx = np.arange(start, start + n, dtype=np.int64)
        return self.images_for(seed, idx, self.labels_for(idx, labels), batch_size)

    def interpolate(self, seed_a: int, seed_b: int, steps: int, label: int | str | None = None) -> np.ndarray:
        """(steps, H, W, C) images along the spherical path from image 0 of ``seed_a`` to that of ``seed_b``."""
        if steps < 2:
            raise EdgegenError(f"steps must be >= 2, got {steps}")
        za = latents(seed_a, np.array([0]), self.meta.latent_dim)[0]
        zb = latents(seed_b, np.array([0]), self.meta.latent_dim)[0]
        z = slerp(za, zb, steps)                                                 # (steps, latent)
        lab = None
        if self.meta.conditional:
            lab = np.full(steps, 0 if label is None else self.class_index(label), dtype=np.int64)
        elif label is not None:
            raise EdgegenError(f"{self.name}: unconditional model; label must be None")
        return self.run(z, lab)

    # ------------------------------------------------------------------ VAE

    def _need_vae(self, need_encoder: bool) -> None:
        if self.meta.kind != "vae-decoder":
            raise EdgegenError(f"{self.name}: a {self.meta.kind} model has no encoder/decoder API (VAE only)")
        if need_encoder and self.encoder is None:
            raise EdgegenError(f"{self.name}: no VAE encoder found beside it (expected <stem>.encoder.onnx)")

    def encode(self, images: np.ndarray, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """VAE posterior of uint8 images (N, H, W, C) or (N, H, W) gray: ``(mean, logvar)`` (N, latent)."""
        self._need_vae(True)
        x = np.asarray(images)
        if x.ndim == 3 and self.meta.channels == 1:
            x = x[..., None]                                                     # (N, H, W) -> (N, H, W, 1)
        if x.dtype != np.uint8 or x.shape[1:] != self.meta.image_shape:
            raise EdgegenError(f"images must be uint8 (N, {', '.join(map(str, self.meta.image_shape))}), "
                               f"got {x.dtype} {x.shape}")
        feeds = {"image": np.ascontiguousarray(x)}
        if self.meta.conditional:
            if labels is None:
                raise EdgegenError("conditional VAE: encode/reconstruct need the images' labels")
            feeds["label"] = self.labels_for(np.arange(len(x)), labels)
        mean, logvar = self.encoder.run(["mean", "logvar"], feeds)  # type: ignore[union-attr]
        return mean, logvar

    def decode(self, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """VAE decoder: latents (N, latent) float32 [+ labels] -> images (N, H, W, C) uint8."""
        self._need_vae(False)
        z = np.asarray(z, dtype=np.float32)
        lab = self.labels_for(np.arange(len(z)), labels) if self.meta.conditional else None
        if not self.meta.conditional and labels is not None:
            raise EdgegenError(f"{self.name}: unconditional model; labels must be None")
        return self.run(z, lab)

    def reconstruct(self, images: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
        """Encode then decode the posterior mean: the VAE's reconstruction of ``images``."""
        mean, _ = self.encode(images, labels)
        return self.decode(mean, labels)

    def __repr__(self) -> str:
        m = self.meta
        return (f"Generator({self.name!r}, kind={m.kind}, {m.image_size}x{m.image_size}x{m.channels}, "
                f"latent={m.latent_dim}, classes={self.num_classes}, {m.quantization}, mode={self.mode}, "
                f"threads={self.threads})")
