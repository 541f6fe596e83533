"""Watermark keys: make one, load one, name it by fingerprint (numpy-free, torch-free).

A key is 32 random bytes, stored as one line of 64 hex digits (file mode 0600). It comes
from ``--key FILE`` or, when no file is given, from ``$EDGEGEN_WATERMARK_KEY`` (the hex
digits themselves, or the path of a key file). The key itself must never be printed,
logged or written into a manifest: everything user-visible uses :func:`key_fingerprint`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from edgegen.errors import EdgegenError
from edgegen.fileio import atomic_write

KEY_BYTES = 32
KEY_ENV = "EDGEGEN_WATERMARK_KEY"
_FINGERPRINT_LABEL = b"edgegen/watermark/fingerprint/v1"


def generate_key() -> bytes:
    """Return a fresh 32-byte key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def key_fingerprint(key: bytes) -> str:
    """A 16-hex-digit public name of ``key`` (HMAC-SHA256 of a fixed label), safe to print or store.

    Different keys give different fingerprints with overwhelming probability, and the
    fingerprint reveals nothing usable about the key (it is a keyed hash of a constant).
    """
    return hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


def parse_key(text: str, source: str) -> bytes:
    """Decode a key written as 64 hex digits (surrounding whitespace ignored); ``source`` names it in errors."""
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        # Never echo the text: it may be a (mistyped) secret.
        raise EdgegenError(f"{source}: not a watermark key (expected {2 * KEY_BYTES} hex digits; "
                           "make one with `edgegen keygen --out FILE`)")
    return key


def write_key(path: str | os.PathLike, key: bytes | None = None, overwrite: bool = False) -> bytes:
    """Write ``key`` (a new one when None) to ``path`` atomically with mode 0600 and return it.

    Refuses to replace an existing file unless ``overwrite`` is set: losing a key makes
    every image marked with it undetectable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise EdgegenError(f"{path}: already exists; refusing to overwrite a key (remove it first, or --force)")
    key = generate_key() if key is None else key
    if len(key) != KEY_BYTES:
        raise EdgegenError(f"a watermark key must be {KEY_BYTES} bytes, got {len(key)}")
    with atomic_write(path, "w", private=True) as f:  # mode 0600
        f.write(key.hex() + "\n")
    return key


def load_key(path: str | os.PathLike | None = None) -> bytes:
    """The configured key: from ``path`` when given, else from ``$EDGEGEN_WATERMARK_KEY``.

    The variable holds either the 64 hex digits or the path of a key file. Raises
    :class:`EdgegenError` with the fix when no key is configured or the key is malformed.
    """
    source = None
    if path is None:
        value = os.environ.get(KEY_ENV, "").strip()
        if not value:
            raise EdgegenError(f"no watermark key configured: pass --key FILE or set ${KEY_ENV} "
                               "(make a key with `edgegen keygen --out FILE`)")
        if len(value) == 2 * KEY_BYTES and _is_hex(value):
            return parse_key(value, f"${KEY_ENV}")
        path, source = value, f"${KEY_ENV}"
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as e:
        # Never echo a value that may be a (mistyped) secret: the variable's, or key digits passed as --key.
        if source is not None:
            raise EdgegenError(f"{source}: neither 64 hex digits nor a readable key file ({e.strerror}; "
                               "value not shown)") from None
        if _is_hex(str(path)) and len(str(path)) >= 16:
            raise EdgegenError(f"--key takes a key FILE, and this value looks like key digits (not shown): "
                               f"put the digits in ${KEY_ENV} or a file instead") from None
        raise EdgegenError(f"{path}: cannot read the watermark key ({e.strerror})") from None
    return parse_key(text, source or str(path))


def _is_hex(text: str) -> bool:
    return all(ch in "0123456789abcdefABCDEF" for ch in text)
