"""The seam between export and runtime: what an edgegen ONNX file says about itself.

Export writes a :class:`ModelMeta` into the ONNX ``metadata_props`` (string key/value pairs,
readable with onnxruntime's ``get_modelmeta().custom_metadata_map``); the runtime reads it back
and needs nothing else. Torch-free and onnx-free.

Graph contract (every kind):
    inputs   ``z``      float32 (N, latent_dim)   N(0, I) noise
             ``label``  int64 (N,)                only when ``conditional``
    output   ``image``  uint8 (N, H, W, C)        ready pixels, 0..255
VAE encoders take ``image`` uint8 (N, H, W, C) [+ ``label``] and return ``mean`` and ``logvar``
float32 (N, latent_dim).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

KINDS = ("gan", "vae-decoder", "vae-encoder")
PREFIX = "edgegen."


@dataclass(frozen=True)
class ModelMeta:
    """Self-description of an exported generator; every field is a string key in metadata_props."""

    kind: str                                  # gan | vae-decoder | vae-encoder
    latent_dim: int
    image_size: int                            # H == W
    channels: int                              # 1 gray, 3 RGB
    version: str                               # edgegen version that wrote the file
    output_dtype: str = "uint8"
    output_range: tuple[float, float] = (0.0, 255.0)
    output_layout: str = "NHWC"
    class_names: tuple[str, ...] = ()          # non-empty iff conditional
    conditional: bool = False
    sampling: str = "prior"                    # prior | expost (VAE decoders with the fitted Gaussian in-graph)
    data_name: str = ""
    data_fingerprint: str = ""                 # fingerprint of the training-set hash index
    quantization: str = "fp32"                 # fp32 | int8 | fp16
    parity_max_abs: float = -1.0               # export parity vs PyTorch, in [-1, 1] units
    model_fingerprint: str = ""                # hash of the graph's weights, set at export
    extra: dict = field(default_factory=dict)  # measured gate figures, training info, ...

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}")

    def to_props(self) -> dict[str, str]:
        """Flatten to ``edgegen.<field>`` string pairs for ONNX metadata_props."""
        out = {}
        for k, v in asdict(self).items():
            out[PREFIX + k] = v if isinstance(v, str) else json.dumps(v)
        return out

    @classmethod
    def from_props(cls, props: dict[str, str]) -> "ModelMeta":
        """Parse metadata_props; raises KeyError/ValueError when fields are missing or malformed."""
        kwargs = {}
        for f in fields(cls):
            key = PREFIX + f.name
            if key not in props:
                if f.name in ("kind", "latent_dim", "image_size", "channels", "version"):
                    raise KeyError(key)
                continue
            raw = props[key]
            value = raw if f.type == "str" else json.loads(raw)
            if isinstance(value, list):
                value = tuple(value)
            kwargs[f.name] = value
        return cls(**kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.image_size, self.image_size, self.channels)
