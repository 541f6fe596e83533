"""Sample quality in the feature space of a small classifier (Inception cannot be downloaded here).

Figures, all computed on the classifier's 128-d penultimate features:
    FCD        Fréchet distance between Gaussian fits (FID's formula, our features)
    KID        unbiased MMD^2 with the cubic polynomial kernel, mean over subsets (x 1000)
    precision / recall   Kynkäänniemi et al. 2019, k = 3 nearest-neighbour balls
    density / coverage   Naeem et al. 2020, k = 5
    class histogram      argmax of the classifier; the smallest fraction exposes mode dropping
Fixed protocol for ``edgegen eval``: 10,000 samples against the 10,000 test images, and beside
each figure the real-vs-real floor (10,000 training images against the same test images).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from edgegen.errors import EdgegenError
from edgegen.training.data import ImageDataset, fit_images, load_dataset
from edgegen.training.models import Classifier, ClassifierConfig

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUNDLED_CLASSIFIER = ASSETS / "classifier.pt"
BUNDLED_DATA = "fashion-mnist"  # the data set the bundled classifier was trained on


def load_classifier(path: str | Path | None = None) -> Classifier:
    """Load a classifier checkpoint (default: the bundled Fashion-MNIST one) in eval mode."""
    from edgegen.training.checkpoint import load_checkpoint

    path = Path(path) if path else BUNDLED_CLASSIFIER
    if not path.is_file():
        raise EdgegenError(f"{path}: no classifier here; train one with `edgegen train classifier`")
    state = load_checkpoint(path)   # weights_only; one clear line for a file that is not a checkpoint
    try:
        net = Classifier(ClassifierConfig(**state["model_config"]))
        # The bundled copy stores float16 weights (half the size); compute is always float32.
        net.load_state_dict({k: v.float() if v.is_floating_point() else v
                             for k, v in state["models"]["classifier"].items()})
    except (KeyError, TypeError, RuntimeError) as e:
        raise EdgegenError(f"{path}: not a classifier checkpoint ({e})") from None
    return net.eval()


def bundle_classifier(run: str | Path, out: str | Path = BUNDLED_CLASSIFIER) -> dict:
    """Write a classifier run's weights (float16, no optimiser state) as the bundled evaluation model."""
    import io

    from edgegen.fileio import write_bytes_atomic
    from edgegen.training.checkpoint import load_checkpoint

    state = load_checkpoint(Path(run) / "best.pt" if Path(run).is_dir() else Path(run))
    if state["kind"] != "classifier":
        raise EdgegenError(f"{run}: a {state['kind']} run is not a classifier")
    sd = {k: v.half() if v.is_floating_point() else v for k, v in state["models"]["classifier"].items()}
    small = {"kind": "classifier", "model_config": state["model_config"], "models": {"classifier": sd},
             "data": state["data"], "metrics": state["metrics"], "step": state["step"], "version": state["version"]}
    buf = io.BytesIO()
    torch.save(small, buf)
    write_bytes_atomic(out, buf.getvalue())
    return state["metrics"]


# ----------------------------------------------------------------------------- metrics on features


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2) for feature arrays (N, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    with warnings.catch_warnings():  # singular for n <= D; the check below handles a failed root
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s_a @ s_b)
        if not np.isfinite(covmean).all():  # near-singular product: regularise as in the FID reference code
            eps = 1e-6 * np.eye(len(s_a))
            covmean = linalg.sqrtm((s_a + eps) @ (s_b + eps))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean.real))


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subsets: int = 10, size: int = 1000,
                              seed: int = 0) -> float:
    """Unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, averaged over random subsets, times 1000."""
    rng = np.random.default_rng(seed)
    d, m = a.shape[1], min(size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x, y = a[rng.choice(len(a), m, replace=False)], b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals) * 1000)


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances (len(a), len(b)), float32 to bound memory."""
    a, b = a.astype(np.float32), b.astype(np.float32)
    return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T, 0)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Squared distance of each row of x to its k-th nearest other row."""
    out = np.empty(len(x), np.float32)
    for i in range(0, len(x), 2000):
        d = _sq_dists(x[i:i + 2000], x)
        out[i:i + 2000] = np.partition(d, k, axis=1)[:, k]  # index 0 is the point itself
    return out


def _ball_counts(q: np.ndarray, ref: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each query row: how many reference balls (ref_j, radii_j) contain it."""
    out = np.empty(len(q), np.int64)
    for i in range(0, len(q), 2000):
        out[i:i + 2000] = (_sq_dists(q[i:i + 2000], ref) <= radii[None, :]).sum(1)
    return out


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    """Kynkäänniemi precision/recall (k = 3) and Naeem density/coverage (k = 5) on features."""
    r3, f3, r5 = _kth_radius(real, 3), _kth_radius(fake, 3), _kth_radius(real, 5)
    precision = float((_ball_counts(fake, real, r3) > 0).mean())
    recall = float((_ball_counts(real, fake, f3) > 0).mean())
    density = float(_ball_counts(fake, real, r5).sum() / (5 * len(fake)))
    nearest_fake = np.concatenate([_sq_dists(real[i:i + 2000], fake).min(1) for i in range(0, len(real), 2000)])
    coverage = float((nearest_fake <= r5).mean())
    return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


# ----------------------------------------------------------------------------- evaluator


@dataclass
class QualityReport:
    """Quality figures of one sample set, with the real-vs-real floor beside them."""

    n: int
    fcd: float
    kid: float
    precision: float
    recall: float
    density: float
    coverage: float
    class_fractions: list[float]
    min_class_fraction: float
    class_names: list[str]
    class_agreement: float | None = None      # conditional: classifier agrees with the requested class
    floor: dict = field(default_factory=dict)  # the same figures for real training images

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A small table: metric, value, real-vs-real floor."""
        rows = [("metric", "samples", "real-vs-real")]
        for k in ("fcd", "kid", "precision", "recall", "density", "coverage", "min_class_fraction"):
            floor = self.floor.get(k)
            rows.append((k, f"{getattr(self, k):.4f}", "" if floor is None else f"{floor:.4f}"))
        if self.class_agreement is not None:
            rows.append(("class_agreement", f"{self.class_agreement:.4f}", ""))
        width = max(len(r[0]) for r in rows)
        lines = [f"{a:<{width}}  {b:>10}  {c:>12}" for a, b, c in rows]
        hist = ", ".join(f"{n}: {f:.3f}" for n, f in zip(self.class_names, self.class_fractions))
        return "\n".join(lines + [f"n = {self.n}; class fractions: {hist}"])


class Evaluator:
    """Computes quality figures of uint8 images against a reference set, in classifier space."""

    def __init__(self, classifier: Classifier, reference: ImageDataset):
        self.classifier = classifier
        self.reference = reference
        self.ref_features, _ = self.features(reference.images)

    @classmethod
    def for_data(cls, data_name: str, reference: ImageDataset, classifier: str | Path | None = None):
        """An evaluator when a classifier fits this data (given, or bundled for Fashion-MNIST), else None."""
        if classifier is None and (data_name != BUNDLED_DATA or not BUNDLED_CLASSIFIER.is_file()):
            return None
        return cls(load_classifier(classifier), reference)

    @torch.no_grad()
    def features(self, images: np.ndarray, batch_size: int = 1000) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, H, W, C) -> features (N, D) float64 and predicted classes (N,)."""
        cfg = self.classifier.cfg
        x = fit_images(images, cfg.image_size, cfg.channels)
        feats, preds = [], []
        for i in range(0, len(x), batch_size):
            t = torch.from_numpy(x[i:i + batch_size]).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
            f = self.classifier.features(t)
            feats.append(f.double().numpy())
            preds.append(self.classifier.head(f).argmax(1).numpy())
        return np.concatenate(feats), np.concatenate(preds)

    def fcd(self, images: np.ndarray) -> float:
        """FCD of ``images`` against the reference set (the quick checkpoint metric)."""
        return frechet_distance(self.features(images)[0], self.ref_features)

    def evaluate(self, images: np.ndarray, labels: np.ndarray | None = None, floor_images: np.ndarray | None = None,
                 seed: int = 0) -> QualityReport:
        """All figures for ``images``; ``labels``: requested classes; ``floor_images``: real images for the floor."""
        if len(images) < 10:
            raise EdgegenError(f"need at least 10 images to evaluate, got {len(images)}")
        feats, preds = self.features(images)
        k = self.classifier.cfg.num_classes
        fractions = np.bincount(preds, minlength=k) / len(preds)
        names = list(self.reference.class_names) or [str(i) for i in range(k)]
        report = QualityReport(
            n=len(images), fcd=frechet_distance(feats, self.ref_features),
            kid=kernel_inception_distance(feats, self.ref_features, seed=seed),
            **precision_recall_density_coverage(self.ref_features, feats),
            class_fractions=[round(float(f), 4) for f in fractions], min_class_fraction=float(fractions.min()),
            class_names=names,
            class_agreement=None if labels is None else float((preds == labels).mean()),
        )
        if floor_images is not None:
            floor = self.evaluate(floor_images, seed=seed)
            report.floor = {k: getattr(floor, k) for k in ("fcd", "kid", "precision", "recall", "density",
                                                           "coverage", "min_class_fraction")}
        return report


# ----------------------------------------------------------------------------- edgegen eval


def _sample_images(target: Path, n: int, seed: int, label: int | None) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Draw ``n`` uint8 images from a run folder / checkpoint or an ONNX model; or read an image folder."""
    if target.suffix == ".onnx":
        from edgegen.runtime import Generator

        gen = Generator.load(target)
        labels = _labels_for(n, len(gen.meta.class_names) if gen.meta.conditional else 0, label, target)
        return gen.generate(n, seed=seed, labels=labels), labels, gen.meta.data_name
    if target.is_dir() and not (target / "last.pt").exists():
        if label is not None:
            raise EdgegenError(f"{target}: --label applies to conditional models, not to a folder of images")
        ds = load_dataset(str(target))
        return ds.images, None, ""
    from edgegen.training.checkpoint import load_run

    run = load_run(target)
    if run.kind == "classifier":
        raise EdgegenError(f"{target}: a classifier run has no samples to evaluate")
    cfg = run.model_config
    gen = torch.Generator().manual_seed(seed)
    k = cfg["num_classes"]
    labels = _labels_for(n, k, label, target)
    out = []
    with torch.no_grad():
        for i in range(0, n, 500):
            z = torch.randn(min(500, n - i), cfg["latent_dim"], generator=gen)
            y = None if labels is None else torch.from_numpy(labels[i:i + len(z)])
            if run.kind == "vae":
                x = run.model.decoder(run.model.sample_latent(z, bool(run.model.expost_fitted)), y)
            else:
                x = run.model(z, y)
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    return np.concatenate(out), labels, run.data.get("name", "")


def _labels_for(n: int, k: int, label: int | None, target: Path) -> np.ndarray | None:
    """Labels to sample with from a model of ``k`` classes (0: unconditional, which takes no --label)."""
    if k == 0:
        if label is not None:
            raise EdgegenError(f"{target}: unconditional model; it takes no --label")
        return None
    if label is not None and not 0 <= label < k:
        raise EdgegenError(f"--label {label} is out of range 0..{k - 1}")
    return np.full(n, label, np.int64) if label is not None else np.arange(n, dtype=np.int64) % k


def evaluate_target(target: str, n: int | None = None, seed: int = 0, data: str = "fashion-mnist",
                    classifier: str | None = None, label: int | None = None) -> QualityReport:
    """``edgegen eval``: quality of a run, an ONNX model or an image folder against ``data``'s test split.

    ``n`` samples are drawn from a run or model (default 10,000); a folder is read whole.
    """
    path = Path(target)
    if not path.exists():
        raise EdgegenError(f"{target}: no such run, model or folder")
    is_folder = path.is_dir() and not (path / "last.pt").exists()
    if is_folder and n is not None:
        raise EdgegenError(f"-n applies when sampling a run or model; {target} is a folder (every image is read)")
    n = 10_000 if n is None else n
    if n < 10:
        raise EdgegenError(f"-n must be at least 10, got {n}")
    images, labels, _ = _sample_images(path, n, seed, label)
    return evaluate_images(images, labels, data=data, classifier=classifier, seed=seed)


def evaluate_images(images: np.ndarray, labels: np.ndarray | None = None, data: str = "fashion-mnist",
                    classifier: str | None = None, seed: int = 0) -> QualityReport:
    """The fixed protocol on uint8 (N, H, W, C) images: against ``data``'s test split, with the floor."""
    net = load_classifier(classifier)
    test = load_dataset(data, "test")
    # The floor uses as many real images as there are samples: FCD and P/R depend on n.
    train = load_dataset(data, "train").subset(len(images), seed=seed)
    return Evaluator(net, test).evaluate(images, labels, floor_images=train.images, seed=seed)
