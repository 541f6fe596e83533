"""Post-inference stages for batch generation (see :class:`edgegen.runtime.batch.Stage`).

Each stage is numpy in, numpy out, and picklable (Ray actors receive it), so the same stage runs
in the local thread pipeline and on Ray. The watermark stage wraps
:mod:`edgegen.safety.watermark`, imported only when a stage is built; it records the payload and
the key's *fingerprint* per image — never the key. The audit stage wraps
:mod:`edgegen.safety.audit` the same way (index reloaded per process) and writes the run-level
summary at the end (:meth:`AuditStage.finish`).
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from edgegen.errors import EdgegenError


def default_payload(model_fingerprint: str, bits: int = 16) -> int:
    """Payload naming the model: the first ``bits`` bits of its fingerprint (hex)."""
    return int(model_fingerprint[:16], 16) >> (64 - bits)


class WatermarkStage:
    """Marks every image with ``payload`` under ``key`` (HMAC-keyed, invisible; see the safety docs).

    Picklable: it keeps the raw key bytes (never its ``repr``/identity/records) and rebuilds the
    :class:`~edgegen.safety.watermark.Watermarker` lazily in each process.
    """

    def __init__(self, key: bytes, payload: int, payload_bits: int = 16):
        from edgegen.safety.watermark import Watermarker   # torch-free; fails clearly if absent

        self._key = key
        self.payload, self.payload_bits = int(payload), payload_bits
        if not 0 <= self.payload < (1 << payload_bits):
            raise EdgegenError(f"watermark payload must be in 0..{(1 << payload_bits) - 1}, got {payload}")
        self._wm: Watermarker | None = Watermarker(key, payload_bits=payload_bits)
        self.fingerprint = self._wm.fingerprint

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_wm"] = None                                 # rebuilt on first use (HMAC tables)
        return state

    def __repr__(self) -> str:
        return f"WatermarkStage(key={self.fingerprint}, payload={self.payload})"

    def identity(self) -> dict:
        from edgegen.safety.watermark import VERSION

        return {"stage": "watermark", "version": VERSION, "key": self.fingerprint, "payload": self.payload,
                "payload_bits": self.payload_bits}

    def __call__(self, images: np.ndarray, indices: np.ndarray,
                 labels: np.ndarray | None) -> tuple[np.ndarray, list[dict], np.ndarray]:
        if self._wm is None:
            from edgegen.safety.watermark import Watermarker
            self._wm = Watermarker(self._key, payload_bits=self.payload_bits)
        marked = self._wm.embed(images, self.payload)      # (N, H, W, C) uint8, luma changed only
        rec = {"watermark": {"payload": self.payload, "key": self.fingerprint}}
        return marked, [rec] * len(indices), np.ones(len(indices), dtype=bool)


ON_COPY = ("flag", "drop")
AUDIT_SUMMARY = "audit.json"


class AuditStage:
    """Audits every image against a training-set hash index; records the verdict, optionally drops copies.

    Per image it adds ``{"audit": {flagged, blank, score, nearest_id, view, hamming, rms, rms_blur,
    cell}}`` to the manifest record (:class:`~edgegen.safety.audit.AuditResult`); with
    ``on_copy="drop"`` flagged copies are not written (still listed, ``dropped: true``). Run it
    *after* the watermark stage so the verdict is about the pixels on disk. ``identity()`` holds
    the index fingerprint, ``fpr``, threshold and ``on_copy``, so a resume with other audit
    settings is refused. :meth:`finish` writes the run-level summary (``audit.json``) from the
    manifest, so it covers resumed shards and shards rendered on Ray actors alike. Picklable: it
    keeps the index path and fingerprint and reloads (and re-verifies) the index in each process.
    """

    def __init__(self, index_path: str | os.PathLike, on_copy: str = "flag", fpr: float | None = None):
        from edgegen.safety.audit import Auditor            # torch-free; numba + scipy
        from edgegen.safety.index import HashIndex

        if on_copy not in ON_COPY:
            raise EdgegenError(f"--on-copy must be flag or drop, got {on_copy!r}")
        self.index_path, self.on_copy = str(index_path), on_copy
        index = HashIndex.load(index_path)
        auditor = Auditor(index, fpr=fpr)                     # refuses an uncalibrated index
        self.fpr, self.threshold = auditor.fpr, float(auditor.threshold)
        self.index_fingerprint = index.fingerprint
        self.image_shape = tuple(index.image_shape)
        self._index: object | None = index
        self._lock: threading.Lock | None = threading.Lock()
        self._ready = False

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_index=None, _lock=None, _ready=False)  # reloaded (memory-mapped) per process
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"AuditStage(index={self.index_fingerprint}, fpr={self.fpr}, on_copy={self.on_copy})"

    def identity(self) -> dict:
        return {"stage": "audit", "index": self.index_fingerprint, "fpr": self.fpr,
                "threshold": self.threshold, "on_copy": self.on_copy}

    def check_model(self, meta, where: str = "model") -> None:
        """Refuse a model this index cannot audit: another training set, or another image size.

        ``meta`` is the model's :class:`~edgegen.modelmeta.ModelMeta`. Its ``data_fingerprint`` (when
        set) names the index export found in the training run (``data_fingerprint_source ==
        "train.idx"``: compared with the index's fingerprint) or the training data itself
        (compared with the data fingerprint the index records). Raises :class:`EdgegenError`.
        """
        shape = (meta.image_size, meta.image_size, meta.channels)
        if shape != self.image_shape:
            raise EdgegenError(f"--audit {self.index_path}: index holds {'x'.join(map(str, self.image_shape))} "
                               f"training images but {where} makes {'x'.join(map(str, shape))} images")
        want = meta.data_fingerprint
        if not want:
            return
        index = self._load()
        source = meta.extra.get("data_fingerprint_source", "")
        ok = {"train.idx": {index.fingerprint}, "run-data": {index.data_fingerprint}}.get(
            source, {index.fingerprint, index.data_fingerprint})
        if want not in ok:
            raise EdgegenError(f"--audit {self.index_path}: index {index.fingerprint} (data "
                               f"{index.data_fingerprint}) is not the index of {where}'s training set "
                               f"({want}); build it with `edgegen index build` on the same data")

    def _load(self):
        if self._index is None:
            from edgegen.safety.index import HashIndex
            self._index = HashIndex.load(self.index_path, expect_fingerprint=self.index_fingerprint)
        return self._index

    def _auditor(self):
        from edgegen.safety.audit import Auditor, _train_features

        with self._lock:                                     # one feature-cache build per process
            index = self._load()
            if not self._ready:
                _train_features(index)
                self._ready = True
        return Auditor(index, fpr=self.fpr, keep=0)          # per call: shards run concurrently

    def __call__(self, images: np.ndarray, indices: np.ndarray,
                 labels: np.ndarray | None) -> tuple[np.ndarray, list[dict], np.ndarray]:
        results = self._auditor().audit(images)
        recs = [{"audit": r.to_dict()} for r in results]
        flagged = np.array([r.flagged for r in results], dtype=bool)
        keep = ~flagged if self.on_copy == "drop" else np.ones(len(results), dtype=bool)
        return images, recs, keep

    def summary(self, manifest_path: str | os.PathLike) -> dict:
        """Run-level audit figures from a finished run's manifest (see :meth:`Auditor.summary`).

        Streams ``manifest.jsonl``; adds ``dropped`` (images not written) and ``on_copy``.
        """
        from edgegen.safety.audit import Auditor

        scores, cells, blank, dropped = [], [], [], 0
        with open(manifest_path, "rb") as f:
            for line in f:
                rec = json.loads(line)
                a = rec["audit"]
                scores.append(np.inf if a["score"] is None else a["score"])
                cells.append(a["cell"])
                blank.append(a["blank"])
                dropped += bool(rec.get("dropped"))
        auditor = Auditor(self._load(), fpr=self.fpr, keep=0)
        auditor.add_scores(np.array(scores, np.float64), np.array(cells, np.int64), np.array(blank, bool))
        return {**auditor.summary(), "on_copy": self.on_copy, "dropped": dropped}

    def finish(self, out: str | os.PathLike) -> None:
        """Write the run's audit summary to ``out/audit.json`` (atomically), from its manifest."""
        from edgegen.fileio import write_json_atomic

        out = Path(out)
        write_json_atomic(out / AUDIT_SUMMARY, self.summary(out / "manifest.jsonl"))
