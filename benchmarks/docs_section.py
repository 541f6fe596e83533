"""Shared by the benchmark scripts: the machine they ran on, and their own section of docs/benchmarks.md.

Each script owns the text between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` and rewrites
only that, atomically, so the scripts can be rerun in any order.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from edgegen.fileio import write_bytes_atomic

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def machine() -> str:
    """'<CPU model>, N cores, Python x.y' as lscpu and the OS report it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")), "?")
    except OSError:
        model = platform.processor() or "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores, Python {platform.python_version()}"


def write_section(name: str, text: str, doc: Path = DOC) -> None:
    """Replace section ``name`` of ``doc`` with ``text`` (markers added here), or append it."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    body = f"{start}\n{text.strip()}\n{end}"
    old = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if start in old and end in old:
        new = old[: old.index(start)] + body + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + body + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(doc, new.encode())
