"""The bundled pretrained models: what ships in ``edgegen/assets/models`` and how good it is.

Each model is an int8 ONNX file that describes itself (metadata); ``models.json`` beside them
records the recipe and the measured quality (written by ``scripts/make_models.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgegen.modelmeta import ModelMeta
from edgegen.runtime.generator import ASSETS, _open_session, session_options


@dataclass(frozen=True)
class BundledModel:
    """One shipped model: its name (for ``--model``), file, metadata and recorded quality."""

    name: str
    path: Path
    meta: ModelMeta
    size_bytes: int
    record: dict = field(default_factory=dict)  # models.json entry: recipe, training time, quality

    def summary(self) -> str:
        """One line: name, kind, classes, quantization, size, FCD/recall of the shipped variant."""
        q = self.record.get("quality", {}).get(self.meta.quantization, {})
        quality = (f"FCD {q['fcd']:.3f} (floor {q['floor']['fcd']:.3f}), recall {q['recall']:.2f}"
                   if q else "quality not recorded")
        kind = self.meta.kind + (" (conditional)" if self.meta.conditional else "")
        return (f"{self.name:<12} {kind:<26} {self.meta.quantization:<5} {self.size_bytes / 1e6:5.2f} MB  "
                f"{self.meta.image_size}x{self.meta.image_size}x{self.meta.channels}  {quality}")


def bundled_models(root: Path = ASSETS) -> list[BundledModel]:
    """All generator models shipped in ``root`` (encoders excluded), sorted by name."""
    records = json.loads((root / "models.json").read_text()) if (root / "models.json").is_file() else {}
    out = []
    for path in sorted(root.glob("*.onnx")) if root.is_dir() else []:
        if ".encoder" in path.name:
            continue
        _, meta = _open_session(path.read_bytes(), str(path), session_options("desktop", 1))
        name = path.name.split(".")[0]
        out.append(BundledModel(name, path, meta, path.stat().st_size, records.get(name, {})))
    return out
