"""Ray Data engine for ``edgegen generate --engine ray``: the same shards, on a cluster.

The shards still to do become Ray datasets (``CHUNK`` shards each); ``map_batches`` runs
:class:`ShardRenderer` in an actor pool, each actor holding its own onnxruntime session (sessions
cannot be pickled, so each actor builds one from the model *bytes* it receives — no shared
filesystem needed). An actor does the CPU work of :func:`edgegen.runtime.batch.render_shard`
(inference, stages such as watermarking, PNG/NPZ encoding) and returns the encoded files and
manifest records; the driver writes files and commits the manifest exactly as the local engine
does, so a run's folder is the same whichever engine made it, and a run started on one engine
resumes on the other. Ray is imported only here.
"""

from __future__ import annotations

import pickle
from itertools import islice
from pathlib import Path
from typing import Iterable

import numpy as np

from edgegen.errors import EdgegenError
from edgegen.runtime.batch import Plan, ShardResult, Stage, render_shard, write_files
from edgegen.runtime.generator import Generator
from edgegen.runtime.manifest import Manifest


class ShardRenderer:
    """Ray Data actor: one onnxruntime session per actor; renders one shard per input row."""

    def __init__(self, model: bytes, plan: Plan, stages: tuple[Stage, ...], threads: int):
        self.gen = Generator.from_bytes(model, name="model", threads=threads, mode="batch")
        self.plan, self.stages = plan, stages

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # batch["shard"]: (B,) shard numbers -> one pickled ShardResult per shard (bytes column)
        blobs = [pickle.dumps(render_shard(self.gen, self.plan, int(k), self.stages), protocol=5)
                 for k in batch["shard"]]
        return {"shard": np.asarray(batch["shard"]), "result": np.array(blobs, dtype=object)}


def _init_ray(address: str | None) -> None:
    try:
        import ray
    except ImportError:
        raise EdgegenError("--engine ray needs Ray: pip install 'edgegen[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise EdgegenError(f"cannot start or join Ray at {address or 'local'}: {e}") from None
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False   # edgegen shows its own bar


CHUNK = 10_000      # shards per Ray dataset: the driver never lists a huge run's whole plan


def run_shards_on_ray(model_path: Path, plan: Plan, todo: Iterable[int], out: Path,
                      manifest: Manifest, stages: tuple[Stage, ...], bar, address: str | None = None,
                      num_actors: int = 1, threads: int | None = None) -> None:
    """Render ``todo`` shards on ``num_actors`` Ray actors; write and commit each as it arrives.

    ``todo`` may be lazy (any length): it is taken ``CHUNK`` shards at a time, one dataset each.
    """
    if num_actors < 1:
        raise EdgegenError(f"--actors must be >= 1, got {num_actors}")
    todo = iter(todo)
    chunk = list(islice(todo, CHUNK))
    if not chunk:
        return
    _init_ray(address)
    import ray

    model = model_path.read_bytes()
    threads = threads or 1                                  # per actor: scale out with actors, not threads
    try:
        while chunk:
            _render_chunk(chunk, model, plan, out, manifest, stages, bar, num_actors, threads)
            chunk = list(islice(todo, CHUNK))
    except ray.exceptions.RayError as e:                    # an actor failed: surface its cause in one line
        cause = getattr(e, "cause", None)
        if isinstance(cause, EdgegenError):
            raise EdgegenError(str(cause)) from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EdgegenError(f"Ray engine failed: {first[:300]}") from None


def _render_chunk(shards: list[int], model: bytes, plan: Plan, out: Path, manifest: Manifest,
                  stages: tuple[Stage, ...], bar, num_actors: int, threads: int) -> None:
    """One Ray dataset of ``shards`` on an actor pool; each result is written and committed here."""
    import ray.data

    ds = ray.data.from_items([{"shard": k} for k in shards], override_num_blocks=min(len(shards), 200))
    ds = ds.map_batches(
        ShardRenderer,
        fn_constructor_kwargs={"model": model, "plan": plan, "stages": stages, "threads": threads},
        batch_size=1, batch_format="numpy", concurrency=num_actors, num_cpus=threads,
    )
    for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=2):
        for blob in batch["result"]:
            res: ShardResult = pickle.loads(blob)
            write_files(out, res.files)                     # OSError -> run_generate's clear message
            manifest.commit(res)
            bar.update(len(res.records))
