"""`run_generate`: the batch job behind ``edgegen generate`` — resumable, streaming, overlapped.

Local engine: the main thread runs inference shard after shard (onnxruntime releases the GIL and
uses its own intra-op threads) while a small thread pool runs the post-inference stages, PNG
encoding (``cv2.imencode`` releases the GIL) and file writes of earlier shards. At most
``workers + 1`` shards are in flight, so memory stays flat for any ``n``. Manifest lines are
committed in shard order by the main thread only after a shard's files are written. The Ray
engine (:mod:`edgegen.runtime.ray_engine`) reuses the same plan, shard functions and manifest.
"""

from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
from tqdm import tqdm

from edgegen.errors import EdgegenError
from edgegen.runtime.batch import Plan, ShardResult, Stage, finish_shard, infer_shard, write_files
from edgegen.runtime.generator import Generator, cpu_count
from edgegen.runtime.latent import check_seed
from edgegen.runtime.manifest import Manifest, clean_temp_files, os_error_message, prepare_folder

ENGINES = ("local", "ray")


@dataclass
class GenerateResult:
    """What a run did: images written now, images found already done, wall time.

    ``redone_images`` (part of ``new_images``) were listed as done but rendered again because a
    file of their shard was missing or damaged; ``redo_reason`` is the first such problem.
    """

    out: Path
    n: int
    new_images: int
    resumed_images: int
    seconds: float
    redone_images: int = 0
    redo_reason: str | None = None

    @property
    def images_per_s(self) -> float:
        return self.new_images / self.seconds if self.seconds > 0 else float("nan")


def make_plan(gen: Generator, n: int, seed: int = 0, cls: str | int | None = None, fmt: str = "png",
              batch_size: int = 256, shard_size: int = 1024, stages: tuple[Stage, ...] = ()) -> Plan:
    """Validate the user's request against the model and build the run's :class:`Plan`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
        raise EdgegenError(f"-n must be a positive integer, got {n}")
    check_seed(seed)
    label = None
    if cls is not None:
        label = gen.class_index(cls)            # clear errors: unconditional model, unknown name, range
    return Plan(n=int(n), seed=int(seed), model_fingerprint=gen.fingerprint, fmt=fmt, label=label,
                class_name=None if label is None else gen.meta.class_names[label],
                class_names=tuple(gen.meta.class_names) if gen.meta.conditional else (),
                batch_size=batch_size, shard_size=shard_size, stages=tuple(s.identity() for s in stages))


def _finish_and_write(out: Path, plan: Plan, k: int, indices: np.ndarray, images: np.ndarray,
                      labels: np.ndarray | None, stages: tuple[Stage, ...]) -> ShardResult:
    res = finish_shard(plan, k, indices, images, labels, stages)
    write_files(out, res.files)
    res.files = []                              # bytes are on disk now; free them before commit
    return res


def run_generate(model: str | os.PathLike, out: str | os.PathLike, n: int, seed: int = 0,
                 cls: str | int | None = None, fmt: str = "png", batch_size: int = 256,
                 threads: int | None = None, shard_size: int = 1024, stages: tuple[Stage, ...] = (),
                 engine: str = "local", ray_address: str | None = None, workers: int | None = None,
                 num_actors: int = 1, progress: bool = True) -> GenerateResult:
    """Generate ``n`` images of ``model`` into folder ``out`` with ``manifest.jsonl``; resumable.

    Rerunning with the same arguments after a kill, a full disk or Ctrl-C continues where the
    manifest ends and finishes with exactly ``n`` indices listed once. ``engine="ray"`` runs the
    shards on Ray Data actors (``ray_address`` to join a cluster; ``num_actors`` sessions).
    Shards the manifest lists whose files are missing or have another size than recorded are
    taken out of it and rendered again (same indices, same pixels); ``redone_images`` says so.
    Errors (bad model/class/n, another run's folder, unwritable folder, disk full) raise
    :class:`EdgegenError` with one clear line; the manifest stays consistent.
    """
    if engine not in ENGINES:
        raise EdgegenError(f"unknown engine {engine!r} (expected local or ray)")
    if num_actors < 1:
        raise EdgegenError(f"--actors must be >= 1, got {num_actors}")
    if workers is not None and workers < 1:
        raise EdgegenError(f"workers must be >= 1, got {workers}")
    out = Path(out)
    gen = Generator.load(model, threads=threads, mode="batch")
    plan = make_plan(gen, n, seed, cls, fmt, batch_size, shard_size, stages)
    for stage in stages:                        # optional hook: refuse a model the stage cannot serve
        check = getattr(stage, "check_model", None)
        if check is not None:
            check(gen.meta, where=str(model))
    # one image first: a model whose real output breaks its metadata fails here, before any folder exists
    infer_shard(gen, replace(plan, n=1, shard_size=1), 0)
    prepare_folder(out, plan)
    clean_temp_files(out)
    try:
        manifest = Manifest(out, plan)
    except OSError as e:
        raise EdgegenError(os_error_message(e, f"{out / 'manifest.jsonl'}: cannot read or repair")) from None
    resumed = manifest.images_done
    redone = sum(plan.shard_len(k) for k in manifest.redo)
    todo = plan.shards_todo(manifest.done)      # lazy: -n 10**12 plans in constant memory
    bar = tqdm(total=plan.n, initial=resumed, unit="img", desc="generate", disable=not progress,
               smoothing=0.05, dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        if engine == "ray":
            from edgegen.runtime.ray_engine import run_shards_on_ray   # Ray only when asked for
            run_shards_on_ray(Path(model), plan, todo, out, manifest, stages, bar,
                              address=ray_address, num_actors=num_actors, threads=threads)
        else:
            _run_local(gen, plan, todo, out, manifest, stages, bar, workers)
    except OSError as e:
        raise EdgegenError(os_error_message(e, f"{out}: stopped") +
                           f"; the manifest lists the {manifest.images_done} finished images — "
                           "fix this and rerun the same command to continue") from None
    finally:
        bar.close()
        manifest.close()
    for stage in stages:                        # optional hook: run-level outputs once every shard is in
        finish = getattr(stage, "finish", None)
        if finish is not None:
            try:
                finish(out)
            except OSError as e:
                raise EdgegenError(os_error_message(e, f"{out}: cannot write the {stage!r} summary") +
                                   "; the images and manifest are complete — rerun the same command") from None
    return GenerateResult(out, plan.n, manifest.images_done - resumed, resumed, time.perf_counter() - t0,
                          redone, next(iter(manifest.redo.values()), None))


def _run_local(gen: Generator, plan: Plan, todo: Iterable[int], out: Path, manifest: Manifest,
               stages: tuple[Stage, ...], bar: tqdm, workers: int | None) -> None:
    """Inference on this thread, stages + encoding + writing on a pool, commits in shard order."""
    workers = workers or max(1, min(4, cpu_count()))
    inflight: deque[Future] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="edgegen-write")

    def commit_oldest() -> None:
        res = inflight.popleft().result()       # re-raises a worker's OSError / EdgegenError here
        manifest.commit(res)
        bar.update(len(res.records))

    try:
        for k in todo:
            indices, images, labels = infer_shard(gen, plan, k)           # (S,), (S, H, W, C), (S,)|None
            inflight.append(pool.submit(_finish_and_write, out, plan, k, indices, images, labels, stages))
            while len(inflight) > workers:      # bound in-flight shards: flat memory for any n
                commit_oldest()
        while inflight:
            commit_oldest()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)   # never leave writers running past an error
