"""The output folder of a generate run: ``run.json`` identity and the ``manifest.jsonl`` journal.

``manifest.jsonl`` holds one JSON line per image index. It is append-only and is also the run's
commit log: a shard counts as done exactly when all of its lines are in the file. Each shard's
lines are appended with one write and fsynced, after the shard's files are in place. On
(re)open, a torn tail (a killed process, a full disk) is cut back to the end of the last complete
shard, and a shard whose listed files are missing or have another size than recorded is taken
out of the manifest (rewritten atomically) to be rendered again, so the manifest only ever lists
finished, present files, each index once.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from edgegen.errors import EdgegenError
from edgegen.fileio import atomic_write, write_json_atomic
from edgegen.runtime.batch import Plan, ShardResult

RUN_FILE = "run.json"
MANIFEST = "manifest.jsonl"


def os_error_message(e: OSError, what: str) -> str:
    """One clear line for an OSError while writing the run (disk full, permissions, ...)."""
    reason = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
              errno.EFBIG: "the file size limit was reached", errno.EACCES: "permission denied",
              errno.EPERM: "permission denied", errno.EROFS: "the file system is read-only"}.get(
        e.errno or -1, e.strerror or str(e))
    return f"{what}: {reason}"


def prepare_folder(out: Path, plan: Plan) -> None:
    """Create ``out`` or accept it as this run's folder; refuse a folder holding other files.

    A folder is this run's when its ``run.json`` has the same identity (model fingerprint, seed,
    n, class, format, shard size, stages). Any other non-empty folder is refused, so a run never
    mixes its files with, or overwrites, someone else's.
    """
    if out.exists() and not out.is_dir():
        raise EdgegenError(f"{out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EdgegenError(os_error_message(e, f"{out}: cannot create the output folder")) from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise EdgegenError(f"{out}: the output folder is not writable")
    ident = plan.identity()
    run_file = out / RUN_FILE
    if run_file.is_file():
        try:
            old = json.loads(run_file.read_text())["identity"]
        except (ValueError, KeyError, OSError):
            raise EdgegenError(f"{run_file}: unreadable run description; use a new folder") from None
        diff = [k for k in sorted(set(old) | set(ident)) if old.get(k) != ident.get(k)]
        if diff:
            k = diff[0]
            raise EdgegenError(f"{out}: holds another run ({k}={old.get(k)!r}, now {ident.get(k)!r}); "
                               "rerun with the same arguments to resume, or choose another folder")
        return
    others = [p.name for p in out.iterdir()]
    if others:
        raise EdgegenError(f"{out}: holds files that are not from an edgegen generate run "
                           f"(e.g. {sorted(others)[0]}); choose an empty or new folder")
    try:
        write_json_atomic(run_file, {"identity": ident, "tool": "edgegen generate"})
    except OSError as e:
        raise EdgegenError(os_error_message(e, f"{run_file}: cannot write")) from None


class Manifest:
    """Append-only journal of finished shards (see module docstring). Not thread-safe: one committer.

    After opening, ``done`` holds the finished shards and ``redo`` maps each shard that was taken
    out because of its files to the first problem found (e.g. ``img-00000003.png is missing``).
    """

    def __init__(self, out: Path, plan: Plan):
        self.out = out
        self.path = out / MANIFEST
        self.plan = plan
        self.done: set[int] = set()
        self.redo: dict[int, str] = {}
        self.images_done = 0
        self._recover()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size

    def _recover(self) -> None:
        """Scan the journal, keep complete shard blocks whose files are intact, cut or drop the rest."""
        if not self.path.exists():
            return
        keep = 0                        # byte offset just after the last complete shard block
        pos = 0
        cur, count = -1, 0              # shard of the block being read, lines seen in it
        problem: str | None = None      # first file problem in the block being read
        checked: set[str] = set()       # files of this block already checked (an npz holds many rows)
        drop: list[tuple[int, int]] = []   # byte ranges of complete blocks whose files are not intact
        with open(self.path, "rb") as f:
            for line in f:               # streams: memory stays flat however long the manifest
                pos += len(line)
                if not line.endswith(b"\n"):
                    break               # torn last write
                try:
                    rec = json.loads(line)
                    k = int(rec["shard"])
                except (ValueError, KeyError, TypeError):
                    break
                if k != cur:
                    if count:           # a block ended before it was complete: stop trusting the rest
                        break
                    cur, count, problem, checked = k, 0, None, set()
                count += 1
                if not 0 <= k < self.plan.num_shards or k in self.done or k in self.redo:
                    raise EdgegenError(f"{self.path}: lists shard {k} twice or out of range; "
                                       "the folder was edited by hand — use a new folder")
                if problem is None:
                    problem = self._file_problem(rec, checked)
                if count == self.plan.shard_len(k):
                    if problem is None:
                        self.done.add(k)
                        self.images_done += count
                    else:
                        self.redo[k] = problem
                        drop.append((keep, pos))
                    keep, cur, count = pos, -1, 0
        if drop:
            self._rewrite_without(drop, keep)
        elif keep != self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def _file_problem(self, rec: dict, checked: set[str]) -> str | None:
        """Why the file a record lists is not as written (missing, other size), or None if it is.

        Only a ``stat``: a size recorded in ``bytes`` is compared, contents are not read.
        """
        name = rec.get("file")
        if name is None:
            return None                 # dropped by a stage: nothing was written
        if not isinstance(name, str):
            return f"file entry {name!r} is not a file name"
        if name in checked:
            return None                 # an npz shard file listed by an earlier row
        checked.add(name)
        try:
            size = os.stat(os.path.join(self.out, name)).st_size
        except OSError:
            return f"{name} is missing"
        if "bytes" in rec and size != rec["bytes"]:
            return f"{name} has {size} bytes, not the {rec['bytes']} written"
        return None

    def _rewrite_without(self, drop: list[tuple[int, int]], end: int) -> None:
        """Atomically replace the journal by its bytes [0, end) less the ``drop`` ranges (streamed)."""
        with open(self.path, "rb") as src, atomic_write(self.path) as dst:
            start = 0
            for a, b in [*drop, (end, end)]:
                src.seek(start)
                left = a - start
                while left:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        raise EdgegenError(f"{self.path}: changed while being repaired; rerun the same command")
                    dst.write(chunk)
                    left -= len(chunk)
                start = b

    def commit(self, result: ShardResult) -> None:
        """Append one shard's records in a single write + fsync; on failure cut the file back."""
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in result.records).encode()
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fsync(self._fd)
        except OSError:
            try:                        # leave no partial block behind
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
            except OSError:
                pass                    # the next open's recovery cuts it instead
            raise
        self._size += len(data)
        self.done.add(result.shard)
        self.images_done += len(result.records)

    def close(self) -> None:
        os.close(self._fd)


def clean_temp_files(out: Path) -> None:
    """Remove temporary files a killed run left behind (``.<name>.tmp``)."""
    for p in out.glob(".*.tmp"):
        try:
            p.unlink()
        except OSError:
            pass
