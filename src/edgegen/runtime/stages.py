"""Post-inference stages for batch generation (see :class:`edgegen.runtime.batch.Stage`).

Each stage is numpy in, numpy out, and picklable (Ray actors receive it), so the same stage runs
in the local thread pipeline and on Ray. The watermark stage wraps
:mod:`edgegen.safety.watermark`, imported only when a stage is built; it records the payload and
the key's *fingerprint* per image — never the key.
"""

from __future__ import annotations

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
        return {"stage": "watermark", "key": self.fingerprint, "payload": self.payload,
                "payload_bits": self.payload_bits}

    def __call__(self, images: np.ndarray, indices: np.ndarray,
                 labels: np.ndarray | None) -> tuple[np.ndarray, list[dict], np.ndarray]:
        if self._wm is None:
            from edgegen.safety.watermark import Watermarker
            self._wm = Watermarker(self._key, payload_bits=self.payload_bits)
        marked = self._wm.embed(images, self.payload)      # (N, H, W, C) uint8, luma changed only
        rec = {"watermark": {"payload": self.payload, "key": self.fingerprint}}
        return marked, [rec] * len(indices), np.ones(len(indices), dtype=bool)
