"""Training loops for the GAN, the VAE and the evaluation classifier, with exact resume.

One loop serves all three kinds; a *task* object holds the networks, optimisers and the step
function of each kind. The loop owns what they share:

- data order: the batch at step s is a pure function of (seed, s) (a seeded permutation per
  epoch), so resuming needs no data-loader state;
- time budget (``--minutes``, counted across resumes) or length (``--epochs``);
- checkpoints every few minutes, at the end, and on Ctrl-C / SIGTERM (at a step boundary),
  written atomically; ``best.pt`` kept beside ``last.pt`` by the quality metric (without a test
  split to measure on, ``best.pt`` is the latest checkpoint);
- progress bar, ``metrics.jsonl``, a sample grid PNG per checkpoint.

Resume restores weights, optimiser state, step and every RNG, so a resumed run takes the same
next step as an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgegen.errors import EdgegenError
from edgegen.fileio import atomic_write, write_bytes_atomic
from edgegen.training.checkpoint import load_checkpoint, save_checkpoint
from edgegen.training.data import ImageDataset, NoSplitError, load_dataset
from edgegen.training.models import VAE, Classifier, ClassifierConfig, Discriminator, GANConfig, Generator, VAEConfig
from edgegen.training.models.gan import ema_update, hinge_d_loss, hinge_g_loss, recompute_bn_stats

if TYPE_CHECKING:
    from edgegen.safety.index import HashIndex


MODE_SEEKING_CONDITIONAL = 0.2
# Measured on the shipped GAN recipe, seeds 0-2 (docs/benchmarks.md, seed spread): capping G's ReLUs
# at 3 takes its int8 export from 97.62 +- 0.19 to 99.31 +- 0.02 % of pixels within 2/255 of fp32
# (gate: 99 %), at FCD 8.58 +- 0.34 against plain ReLUs' 8.40 +- 0.15. A cap of 4 (one seed: activation
# cap section) trained to FCD 7.82 but its int8 keeps only 98.89 %.
GAN_ACT_CLIP = 3.0
MAX_CLUSTERS = 1000


@dataclass
class TrainOptions:
    kind: str                          # gan | vae | classifier
    out: str
    data: str = "fashion-mnist"
    minutes: float | None = None       # wall-clock budget across resumes; default 10 if no epochs
    epochs: float | None = None
    seed: int = 0
    size: int = 32
    channels: int | None = None        # default: the data's
    conditional: bool = False
    batch_size: int = 64
    device: str | None = None          # default: cuda when present
    resume: bool = False
    skip_bad: bool = False
    checkpoint_minutes: float = 2.0
    width: int | None = None
    latent_dim: int | None = None
    lr: float | None = None
    beta: float = 1.0
    mode_seeking: float | None = None  # GAN: mode-seeking weight (MSGAN); default 0.2 if (self-)conditional, else 0
    upsample: str = "nearest"
    act_clip: float | None = None      # GAN: cap of G's ReLUs (0: none); default GAN_ACT_CLIP; see models.gan.activation
    clusters: int = 0                  # GAN: self-condition on this many label-free clusters (training.clusters)
    progress: bool = True
    quality_samples: int = 2000        # samples for the checkpoint-time FCD (best.pt selection)
    log_every: int = 50                # steps between metrics.jsonl lines


# ----------------------------------------------------------------------------- tasks


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [-1, 1]."""
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class GANTask:
    """Hinge-loss GAN with spectral-norm D, EMA generator, BN stats recomputed for the EMA."""

    metric_name, metric_higher_better = "fcd", False

    def __init__(self, cfg: GANConfig, opts: TrainOptions, device: torch.device):
        self.cfg, self.device = cfg, device
        self.G, self.D = Generator(cfg).to(device), Discriminator(cfg).to(device)
        self.G_ema = copy.deepcopy(self.G).eval()
        lr = opts.lr or 2e-4
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr, betas=(0.5, 0.999))
        self.rng = torch.Generator().manual_seed(opts.seed + 1)   # latents and fake labels
        self.mode_seeking = opts.mode_seeking

    def step(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, float]:
        n, h = len(x), len(x) // 2
        z = torch.randn(n, self.cfg.latent_dim, generator=self.rng).to(self.device)
        yf = (torch.randint(0, self.cfg.num_classes, (n,), generator=self.rng).to(self.device)
              if self.cfg.conditional else None)
        # Pairs (i, i + n/2) share a label for the mode-seeking term; a self-conditioned G draws its
        # cluster from z's last coordinate, so the pairs share that coordinate.
        if self.mode_seeking and yf is not None:
            yf[n - h:] = yf[:h]
        if self.cfg.cluster_freq:
            if self.mode_seeking:
                z[n - h:, -1] = z[:h, -1]
            yf = self.G.cluster_of(z)
        fake = self.G(z, yf)                                          # (N, C, H, W)
        d_loss = hinge_d_loss(self.D(x, y), self.D(fake.detach(), yf))
        self.opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self.opt_d.step()
        g_loss = hinge_g_loss(self.D(fake, yf))
        logs = {"d_loss": d_loss.item(), "g_loss": g_loss.item()}
        if self.mode_seeking:
            # MSGAN (Mao et al. 2019): two latents with the same label must give images as far apart
            # as the latents are; G minimises the inverse ratio, so collapsing a class costs it.
            ratio = ((fake[:h] - fake[n - h:]).abs().mean(dim=(1, 2, 3))
                     / (z[:h] - z[n - h:]).abs().mean(dim=1)).mean()
            g_loss = g_loss + self.mode_seeking / (ratio + 1e-5)
            logs["ms_ratio"] = ratio.item()
        self.opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        self.opt_g.step()
        ema_update(self.G_ema, self.G, decay=min(0.999, (1 + step) / (10 + step)))
        return logs

    def inference_model(self) -> Generator:
        """EMA generator with BN statistics recomputed for its averaged weights (eval mode)."""
        # BN buffers follow the live G's running stats until recomputed for the EMA weights.
        for be, bm in zip(self.G_ema.buffers(), self.G.buffers()):
            be.copy_(bm)
        recompute_bn_stats(self.G_ema, batches=16, batch_size=128)
        return self.G_ema.eval()

    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, self.cfg.latent_dim, generator=g).to(self.device)
        if self.cfg.conditional and labels is None:
            labels = torch.arange(n) % self.cfg.num_classes
        with torch.no_grad():
            return self.G_ema(z, None if labels is None else labels.to(self.device))

    def state(self) -> dict:
        return {"models": {"G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict()},
                "optimizers": {"G": self.opt_g.state_dict(), "D": self.opt_d.state_dict()},
                "task_rng": self.rng.get_state()}

    def load(self, state: dict) -> None:
        for name, m in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema)):
            m.load_state_dict(state["models"][name])
        self.opt_g.load_state_dict(state["optimizers"]["G"])
        self.opt_d.load_state_dict(state["optimizers"]["D"])
        self.rng.set_state(state["task_rng"])


class VAETask:
    """beta-VAE trained on the negative ELBO; the ex-post Gaussian is refitted at each checkpoint."""

    metric_name, metric_higher_better = "fcd", False

    def __init__(self, cfg: VAEConfig, opts: TrainOptions, device: torch.device, data: ImageDataset):
        self.cfg, self.device, self.data = cfg, device, data
        self.vae = VAE(cfg).to(device)
        self.opt = torch.optim.Adam(self.vae.parameters(), opts.lr or 1e-3)

    def step(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, float]:
        self.vae.train()
        loss, parts = self.vae.loss(x, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item(), **parts}

    def inference_model(self) -> VAE:
        images = _to_float(torch.from_numpy(self.data.images))
        labels = None if not self.cfg.conditional else torch.from_numpy(self.data.labels)
        self.vae.fit_expost(images, labels)
        return self.vae.eval()

    def sample(self, n: int, seed: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(n, self.cfg.latent_dim, generator=g).to(self.device)
        if self.cfg.conditional and labels is None:
            labels = torch.arange(n) % self.cfg.num_classes
        self.vae.eval()
        with torch.no_grad():
            z = self.vae.sample_latent(eps, expost=bool(self.vae.expost_fitted))
            return self.vae.decoder(z, None if labels is None else labels.to(self.device))

    def state(self) -> dict:
        return {"models": {"vae": self.vae.state_dict()}, "optimizers": {"vae": self.opt.state_dict()}}

    def load(self, state: dict) -> None:
        self.vae.load_state_dict(state["models"]["vae"])
        self.opt.load_state_dict(state["optimizers"]["vae"])


class ClassifierTask:
    """Cross-entropy with random 2-px shifts and flips, cosine learning-rate decay; metric: test accuracy."""

    metric_name, metric_higher_better = "accuracy", True

    def __init__(self, cfg: ClassifierConfig, opts: TrainOptions, device: torch.device, total_steps: int | None):
        self.cfg, self.device, self.total_steps = cfg, device, total_steps
        self.net = Classifier(cfg).to(device)
        self.lr = opts.lr or 2e-3
        self.opt = torch.optim.Adam(self.net.parameters(), self.lr, weight_decay=1e-4)
        self.rng = torch.Generator().manual_seed(opts.seed + 1)

    def step(self, x: torch.Tensor, y: torch.Tensor | None, step: int) -> dict[str, float]:
        if self.total_steps:  # a function of the step alone, so resume stays exact
            for group in self.opt.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * min(step / self.total_steps, 1.0)))
        self.net.train()
        dx, dy = (torch.randint(-2, 3, (2,), generator=self.rng)).tolist()
        x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
        if torch.rand(1, generator=self.rng).item() < 0.5:
            x = x.flip(3)
        loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.item()}

    def inference_model(self) -> Classifier:
        return self.net.eval()

    def state(self) -> dict:
        return {"models": {"classifier": self.net.state_dict()}, "optimizers": {"classifier": self.opt.state_dict()},
                "task_rng": self.rng.get_state()}

    def load(self, state: dict) -> None:
        self.net.load_state_dict(state["models"]["classifier"])
        self.opt.load_state_dict(state["optimizers"]["classifier"])
        self.rng.set_state(state["task_rng"])


# ----------------------------------------------------------------------------- the loop


def check_options(opts: TrainOptions) -> None:
    """Refuse bad option values before anything is read or written; the message names the CLI option.

    ``None`` means "not set" (the default applies); a value that is set must make sense, so
    ``--epochs 0`` is an error, not "no limit".
    """
    if opts.kind not in ("gan", "vae", "classifier"):
        raise EdgegenError(f"unknown model kind {opts.kind!r} (expected gan, vae or classifier)")
    for option, value in (("--epochs", opts.epochs), ("--minutes", opts.minutes), ("--lr", opts.lr),
                          ("--checkpoint-minutes", opts.checkpoint_minutes)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise EdgegenError(f"{option} must be a positive number, got {value:g}")
    for option, value in (("--beta", opts.beta), ("--mode-seeking", opts.mode_seeking), ("--act-clip", opts.act_clip)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise EdgegenError(f"{option} must be zero or a positive number, got {value:g}")
    for option, value in (("--batch-size", opts.batch_size), ("--width", opts.width),
                          ("--latent-dim", opts.latent_dim)):
        if value is not None and value < 1:
            raise EdgegenError(f"{option} must be at least 1, got {value}")
    if opts.seed < 0:
        raise EdgegenError(f"--seed must be zero or positive, got {opts.seed}")
    if opts.size not in (28, 32, 64):
        raise EdgegenError(f"--size must be 28, 32 or 64, got {opts.size}")
    if opts.channels not in (None, 1, 3):
        raise EdgegenError(f"--channels must be 1 or 3, got {opts.channels}")
    if opts.clusters and (opts.kind != "gan" or opts.conditional):
        raise EdgegenError("--clusters applies to unconditional GANs (it replaces labels, not adds to them)")
    if opts.clusters < 0 or opts.clusters == 1 or opts.clusters > MAX_CLUSTERS:
        raise EdgegenError(f"--clusters must be 0 (off) or 2..{MAX_CLUSTERS}, got {opts.clusters}")


def _model_config(opts: TrainOptions, data: ImageDataset, cluster_freq: list[float]) -> dict:
    channels = data.image_shape[2]
    k = data.num_classes if opts.conditional else 0
    if opts.conditional and not k:
        raise EdgegenError(f"{opts.data}: --conditional needs labelled data (no classes found)")
    extra = {key: v for key, v in (("width", opts.width), ("latent_dim", opts.latent_dim)) if v is not None}
    if opts.kind == "gan":
        d_width = {"d_width": opts.width} if opts.width else {}  # --width scales both networks
        return GANConfig(image_size=opts.size, channels=channels, num_classes=k, upsample=opts.upsample,
                         act_clip=opts.act_clip, cluster_freq=cluster_freq, **extra, **d_width).to_dict()
    if opts.kind == "vae":
        return VAEConfig(image_size=opts.size, channels=channels, num_classes=k, upsample=opts.upsample,
                         beta=opts.beta, **extra).to_dict()
    if not data.num_classes:
        raise EdgegenError(f"{opts.data}: the classifier needs labelled data (no classes found)")
    return ClassifierConfig(num_classes=data.num_classes, channels=channels, image_size=opts.size,
                            **({"width": opts.width} if opts.width else {})).to_dict()


def _make_task(kind: str, cfg: dict, opts: TrainOptions, device: torch.device, data: ImageDataset):
    if kind == "gan":
        return GANTask(GANConfig(**cfg), opts, device)
    if kind == "vae":
        return VAETask(VAEConfig(**cfg), opts, device, data)
    total = math.ceil(opts.epochs * (len(data) // opts.batch_size)) if opts.epochs else None
    return ClassifierTask(ClassifierConfig(**cfg), opts, device, total)


def _resolve_device(name: str | None) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EdgegenError("--device cuda: no CUDA device is available")
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


class _StopFlag:
    """First Ctrl-C / SIGTERM asks the loop to checkpoint and stop at the next step boundary."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second signal: give up at once (the last checkpoint is intact)
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid, atomically."""
    import cv2

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    n, h, w, c = x.shape
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * (h + 2) + 2, nrow * (w + 2) + 2, c), np.uint8)
    for i, img in enumerate(x):
        r, col = divmod(i, nrow)
        grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img
    ok, png = cv2.imencode(".png", grid if c == 1 else cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
    write_bytes_atomic(path, png.tobytes())


def train(opts: TrainOptions) -> Path:
    """Train (or resume) a run in ``opts.out``; returns the path of its final ``last.pt``."""
    check_options(opts)
    out = Path(opts.out)
    last = out / "last.pt"
    state = None
    if opts.resume:
        state = load_checkpoint(last)
        saved = state["train_config"]
        if saved["kind"] != opts.kind:
            raise EdgegenError(f"{last}: this run trains a {saved['kind']}, not a {opts.kind}")
        # The run's own recipe wins; only the budget and the progress display may change on resume.
        opts = TrainOptions(**{**saved, "out": str(out),
                               "minutes": opts.minutes if opts.minutes is not None else saved["minutes"],
                               "mode_seeking": saved.get("mode_seeking", 0.0),   # runs from before the option
                               "act_clip": saved.get("act_clip", 0.0),
                               "epochs": opts.epochs if opts.epochs is not None else saved["epochs"],
                               "resume": True, "progress": opts.progress, "device": opts.device or saved["device"]})
    elif last.exists():
        raise EdgegenError(f"{out}: already holds a run; pass --resume to continue it or choose another --out")
    if opts.minutes is None and opts.epochs is None:
        opts.minutes = 10.0
    if opts.mode_seeking is None:
        # Measured (docs/benchmarks.md, models): without it the conditional GAN collapses to one image
        # per class (recall 0.01); 0.2 keeps class agreement at 0.90 with recall 0.6 (0.3: more diverse,
        # agreement 0.88). The unconditional GAN trained no better with it (0.3), so it stays off there;
        # a self-conditioned GAN trains as a conditional one on its clusters, and gets it too.
        opts.mode_seeking = (MODE_SEEKING_CONDITIONAL if opts.kind == "gan" and (opts.conditional or opts.clusters)
                             else 0.0)
    if opts.act_clip is None:
        opts.act_clip = GAN_ACT_CLIP if opts.kind == "gan" else 0.0

    data = load_dataset(opts.data, "train", size=opts.size, channels=opts.channels, skip_bad=opts.skip_bad)
    if len(data) < opts.batch_size:
        raise EdgegenError(f"{opts.data}: {len(data)} images, fewer than one batch of {opts.batch_size}")
    data_info = {"name": data.name, "fingerprint": data.fingerprint(), "class_names": list(data.class_names),
                 "image_size": opts.size, "channels": data.image_shape[2], "n": len(data)}
    if state is not None and state["data"]["fingerprint"] != data_info["fingerprint"]:
        raise EdgegenError(f"{opts.data}: data differs from the data this run was trained on (fingerprint mismatch)")

    # Everything that can fail on bad input happens before the run folder is made: no half-made runs.
    device = _resolve_device(opts.device)
    torch.manual_seed(opts.seed)
    # Self-conditioning: cluster ids stand in for labels; they are kept with the run, for resuming.
    clusters, freq = None, []
    if opts.clusters and state:
        clusters = state["cluster_labels"].long().numpy()
    elif opts.clusters:
        from edgegen.training.clusters import find_clusters

        found = find_clusters(data.images, opts.clusters, opts.seed)
        clusters, freq = found.labels, found.freq.tolist()
    model_config = state["model_config"] if state else _model_config(opts, data, freq)
    task = _make_task(opts.kind, model_config, opts, device, data)
    test = _test_split(opts, data)
    quality = _QualityProbe(opts, test, data.name)
    index = _training_index(opts, data, test) if state is None and opts.kind != "classifier" else None

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    step, elapsed, best, metrics = 0, 0.0, None, {}
    if state is not None:
        task.load(state)
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, best, metrics = state["step"], state["elapsed"], state.get("best"), state.get("metrics", {})
        _truncate_metrics(out / "metrics.jsonl", step)
    else:
        (out / "config.json").write_text(json.dumps({"train": asdict(opts), "model": model_config,
                                                     "data": data_info}, indent=2))
        if index is not None:
            index.save(out / "train.idx")

    images_u8 = torch.from_numpy(data.images)                         # (N, H, W, C) uint8, stays on CPU
    labels = clusters if clusters is not None else data.labels
    labels = torch.from_numpy(labels) if labels is not None else None
    saved_clusters = {} if clusters is None else {"cluster_labels": torch.from_numpy(clusters.astype(np.int16))}
    steps_per_epoch = len(data) // opts.batch_size
    total_steps = math.ceil(opts.epochs * steps_per_epoch) if opts.epochs else None
    budget = opts.minutes * 60 if opts.minutes else None

    def done() -> bool:
        return (total_steps is not None and step >= total_steps) or (budget is not None and elapsed >= budget)

    def checkpoint() -> None:
        nonlocal best, metrics
        model = task.inference_model()
        if opts.kind != "classifier":
            save_grid(task.sample(64, seed=opts.seed), out / "samples" / f"step_{step:07d}.png")
        metrics = quality.measure(task, model)
        ckpt = {"kind": opts.kind, "step": step, "elapsed": elapsed, "model_config": model_config,
                "train_config": asdict(opts), "data": data_info, "metrics": metrics,
                "torch_rng": torch.get_rng_state(), **task.state(), **saved_clusters}
        value = metrics.get(task.metric_name)
        better = value is not None and (best is None or (value > best if task.metric_higher_better else value < best))
        if better:
            best = value
        ckpt["best"] = best
        save_checkpoint(last, ckpt)
        if better or value is None or not (out / "best.pt").exists():  # no metric: the latest is the best
            save_checkpoint(out / "best.pt", ckpt)
        _log(out, {"step": step, "elapsed": round(elapsed, 1), "checkpoint": True, **metrics})

    perm_epoch, perm = -1, None
    bar = tqdm(total=total_steps or int(budget), initial=step if total_steps else int(elapsed),
               disable=not opts.progress, unit="step" if total_steps else "s", dynamic_ncols=True)
    last_ckpt = time.monotonic()
    with _StopFlag() as stop:
        while not done() and not stop.requested:
            epoch, i = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:  # the data order is a function of (seed, epoch) only
                perm = torch.from_numpy(np.random.default_rng([opts.seed, epoch]).permutation(len(data)))
                perm_epoch = epoch
            idx = perm[i * opts.batch_size:(i + 1) * opts.batch_size]
            x = _to_float(images_u8[idx]).to(device)
            y = labels[idx].to(device) if labels is not None else None
            t0 = time.monotonic()
            logs = task.step(x, y, step)
            dt = time.monotonic() - t0
            step += 1
            elapsed += dt
            bar.update(1 if total_steps else int(elapsed) - bar.n)
            if step % opts.log_every == 0 or step == 1:
                bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items()} | {"img/s": f"{len(x) / dt:.0f}"})
                _log(out, {"step": step, "elapsed": round(elapsed, 2), "images_per_s": round(len(x) / dt, 1), **logs})
            if time.monotonic() - last_ckpt >= opts.checkpoint_minutes * 60:
                checkpoint()
                last_ckpt = time.monotonic()
        bar.close()
        checkpoint()
    if stop.requested and not done():
        print(f"stopped at step {step}; continue with: edgegen train {opts.kind} --out {out} --resume")
    return last


def _log(out: Path, record: dict) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from, so the log has no duplicates."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    with atomic_write(path, "w") as f:
        f.write("".join(line + "\n" for line in keep))


def _test_split(opts: TrainOptions, data: ImageDataset) -> ImageDataset | None:
    """The held-out split fitted like the training data (read once per run), or None when there is none."""
    if Path(opts.data).is_file():  # one IDX file: its "test" split would be the training images themselves
        return None
    try:
        return load_dataset(opts.data, "test", size=opts.size, channels=data.image_shape[2], skip_bad=opts.skip_bad)
    except NoSplitError:
        return None


def _training_index(opts: TrainOptions, data: ImageDataset, test: ImageDataset | None) -> HashIndex | None:
    """The memorization audit's index of the training set, calibrated on the test split (not saved yet).

    Without a test split there is nothing to calibrate on: no index, and one line says how to get one.
    """
    if test is None:
        print(f"edgegen: note: {opts.data} has no test split, so the memorization index train.idx was not "
              "built; to get one, split the images into train/ and test/ sub-folders and run "
              "`edgegen index build --data FOLDER --out train.idx`", file=sys.stderr)
        return None
    from edgegen.safety.index import build_index

    return build_index(data, test, None)


class _QualityProbe:
    """Checkpoint-time quality: FCD of samples vs test images (GAN/VAE), test accuracy (classifier)."""

    def __init__(self, opts: TrainOptions, test: ImageDataset | None, data_name: str):
        self.opts, self.test, self.data_name, self.evaluator = opts, test, data_name, None

    @torch.no_grad()
    def measure(self, task, model: nn.Module) -> dict:
        if self.test is None:
            return {}
        if self.opts.kind == "classifier":
            x = _to_float(torch.from_numpy(self.test.images))
            pred = torch.cat([model(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
            return {"accuracy": float((pred.numpy() == self.test.labels).mean())}
        if self.evaluator is None:  # looked up at each checkpoint: a classifier may be bundled meanwhile
            from edgegen.training.evaluate import Evaluator
            self.evaluator = Evaluator.for_data(self.data_name, self.test.subset(self.opts.quality_samples, seed=1))
        if self.evaluator is None:
            return {}
        n = self.opts.quality_samples
        imgs = task.sample(n, seed=12345)
        u8 = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return {"fcd": round(self.evaluator.fcd(u8), 4), "quality_samples": n}
