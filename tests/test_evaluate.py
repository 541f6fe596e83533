"""Quality evaluation: metric sanity on known distributions, and the bundled classifier on real data."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from edgegen.cli import main
from edgegen.training.data import load_dataset
from edgegen.training.evaluate import (BUNDLED_CLASSIFIER, Evaluator, frechet_distance,
                                       kernel_inception_distance, load_classifier,
                                       precision_recall_density_coverage)


def test_frechet_distance_of_shifted_gaussians():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(20_000, 4)), rng.normal(size=(20_000, 4)) + [1.0, 0, 0, 0]
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, b) == pytest.approx(1.0, abs=0.05)  # |mu_a - mu_b|^2, same covariance


def test_kid_is_unbiased_near_zero_for_same_distribution():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2000, 8)), rng.normal(size=(2000, 8))
    assert abs(kernel_inception_distance(a, b)) < 5
    assert kernel_inception_distance(a, b + 1.0) > 100


def test_precision_recall_detects_mode_collapse():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(1000, 4))
    same = precision_recall_density_coverage(real, rng.normal(size=(1000, 4)))
    assert same["precision"] > 0.85 and same["recall"] > 0.85 and same["coverage"] > 0.85
    collapsed = precision_recall_density_coverage(real, real[:1].repeat(1000, 0) + 1e-3 * rng.normal(size=(1000, 4)))
    assert collapsed["precision"] == 1.0 and collapsed["recall"] < 0.1


@pytest.fixture(scope="module")
def evaluator():
    test = load_dataset("fashion-mnist", "test", size=32).subset(2000, seed=0)
    return Evaluator(load_classifier(), test)


def test_bundled_classifier_accuracy_and_size():
    assert BUNDLED_CLASSIFIER.stat().st_size < 1_500_000
    net = load_classifier()
    test = load_dataset("fashion-mnist", "test", size=32)
    x = torch.from_numpy(test.images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        pred = torch.cat([net(x[i:i + 2000]).argmax(1) for i in range(0, len(x), 2000)]).numpy()
    assert (pred == test.labels).mean() >= 0.90


def test_real_vs_real_near_floor_noise_far(evaluator):
    real = load_dataset("fashion-mnist", "train", size=32).subset(2000, seed=1).images
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    r, n = evaluator.evaluate(real), evaluator.evaluate(noise)
    assert r.fcd < 0.05 * n.fcd
    assert r.precision > 0.6 and r.recall > 0.6 and n.recall < 0.05 and n.density < 0.5
    assert min(r.class_fractions) > 0.07  # ten balanced classes
    assert max(n.class_fractions) > 0.5   # noise lands in one or two classes


def test_blurred_images_score_between(evaluator):
    real = load_dataset("fashion-mnist", "train", size=32).subset(2000, seed=1).images
    blurred = np.stack([cv2.GaussianBlur(i, (0, 0), 1.5)[..., None] for i in real])
    assert evaluator.fcd(real) < evaluator.fcd(blurred)


def test_eval_cli_on_image_folder(tmp_path, fmnist_test, small_idx_dir, capsys):
    for i in range(60):
        cv2.imwrite(str(tmp_path / f"{i}.png"), fmnist_test.images[i])
    # what `edgegen generate` writes beside its images is not an image, and not an error either
    (tmp_path / "manifest.jsonl").write_text('{"index": 0, "file": "0.png"}\n')
    (tmp_path / "run.json").write_text("{}")
    # --data: a small real Fashion-MNIST subset as the reference keeps the test fast
    assert main(["eval", str(tmp_path), "--data", str(small_idx_dir), "--json", str(tmp_path / "q.json")]) == 0
    out = capsys.readouterr().out
    assert "fcd" in out and "real-vs-real" in out
    assert (tmp_path / "q.json").is_file()
    assert main(["eval", str(tmp_path), "-n", "60", "--data", str(small_idx_dir)]) == 2     # a folder is read whole
    assert "-n applies when sampling a run or model" in capsys.readouterr().err


def test_eval_cli_errors(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing")]) == 2
    assert "no such folder, model file or bundled model" in capsys.readouterr().err


def test_eval_cli_on_run_and_exported_model(tmp_path, small_idx_dir, capsys):
    """`edgegen eval` takes a run folder and its ONNX export alike; the same model scores alike."""
    from edgegen.training.train import TrainOptions, train

    run = train(TrainOptions(kind="gan", data=str(small_idx_dir), out=str(tmp_path / "run"), epochs=0.0625,
                             batch_size=32, width=8, latent_dim=16, progress=False)).parent
    assert main(["export", str(run), "--out", str(tmp_path / "g.onnx")]) == 0
    capsys.readouterr()
    for target, name in ((run, "run.json"), (tmp_path / "g.onnx", "onnx.json")):
        assert main(["eval", str(target), "-n", "200", "--data", str(small_idx_dir),
                     "--json", str(tmp_path / name)]) == 0
    import json

    for target in (run, tmp_path / "g.onnx"):                      # unconditional: --label is refused
        assert main(["eval", str(target), "--label", "3", "--data", str(small_idx_dir)]) == 2
        assert "unconditional model; it takes no --label" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("run.json", "onnx.json"))
    assert a["n"] == b["n"] == 200
    # Different latent draws (torch vs the runtime's counter-based latents) of one model: close figures.
    assert abs(a["fcd"] - b["fcd"]) < 0.25 * max(a["fcd"], b["fcd"])
    assert abs(a["min_class_fraction"] - b["min_class_fraction"]) < 0.05


def test_eval_label_refused_for_unconditional_model_and_folder(tmp_path, capsys):
    from edgegen.training.evaluate import ASSETS

    for target, message in ((ASSETS / "models" / "gan.int8.onnx", "unconditional model; it takes no --label"),
                            (tmp_path, "--label applies to conditional models, not to a folder of images")):
        assert main(["eval", str(target), "--label", "3"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"edgegen: error: {target}: {message}"


def test_bad_classifier_file_is_one_line(tmp_path):
    from edgegen.errors import EdgegenError

    bad = tmp_path / "c.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(EdgegenError, match=r"c\.pt: not a readable edgegen checkpoint") as e:
        load_classifier(bad)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
