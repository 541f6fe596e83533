"""Self-conditioned GANs: label-free clusters, a generator that draws its own cluster, an unconditional export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgegen.errors import EdgegenError
from edgegen.training.checkpoint import load_checkpoint, load_run
from edgegen.training.clusters import find_clusters
from edgegen.training.models import GANConfig, Generator
from edgegen.training.train import GANTask, TrainOptions, train


def _groups(n_per: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy 16x16 images of len(n_per) kinds (a bright top, bottom, left or right half), shuffled."""
    rng = np.random.default_rng(seed)
    halves = [np.s_[:8, :], np.s_[8:, :], np.s_[:, :8], np.s_[:, 8:]]
    images, kinds = [], []
    for kind, n in enumerate(n_per):
        x = rng.integers(0, 60, (n, 16, 16, 1))
        x[(slice(None), *halves[kind])] += 180
        images.append(x)
        kinds += [kind] * n
    order = rng.permutation(sum(n_per))
    return np.concatenate(images).astype(np.uint8)[order], np.array(kinds)[order]


def test_clusters_recover_the_kinds_of_image_largest_first():
    images, kinds = _groups((60, 150, 90))
    found = find_clusters(images, 3, seed=0)
    assert found.labels.dtype == np.int64 and found.labels.shape == (300,)
    # Each kind is exactly one cluster, numbered by size: 150 -> 0, 90 -> 1, 60 -> 2.
    assert np.array_equal(found.labels, np.array([2, 0, 1])[kinds])
    assert np.allclose(found.freq, [0.5, 0.3, 0.2])
    assert np.array_equal(find_clusters(images, 3, seed=0).labels, found.labels)   # deterministic


def test_clusters_refuse_what_cannot_be_clustered():
    images, _ = _groups((10, 10))
    with pytest.raises(EdgegenError, match="at least 2"):
        find_clusters(images, 1)
    with pytest.raises(EdgegenError, match="20 images are too few for 3 clusters"):
        find_clusters(images, 3)


def test_generator_draws_clusters_in_their_training_shares():
    cfg = GANConfig(image_size=28, latent_dim=16, width=8, d_width=8, cluster_freq=[0.5, 0.3, 0.2])
    gen = Generator(cfg).eval()
    z = torch.randn(40_000, 16, generator=torch.Generator().manual_seed(0))
    shares = torch.bincount(gen.cluster_of(z), minlength=3).double() / len(z)
    assert torch.allclose(shares, torch.tensor([0.5, 0.3, 0.2], dtype=torch.double), atol=0.01)
    with torch.no_grad():
        assert torch.equal(gen(z[:8]), gen(z[:8], gen.cluster_of(z[:8])))        # no label needed
    assert not cfg.conditional and cfg.groups == 3
    with pytest.raises(ValueError, match="either class-conditional or self-conditioned"):
        GANConfig(num_classes=10, cluster_freq=[0.5, 0.5])


def test_mode_seeking_pairs_share_the_cluster(tmp_path):
    cfg = GANConfig(image_size=28, latent_dim=16, width=8, d_width=8, cluster_freq=[0.25] * 4)
    opts = TrainOptions(kind="gan", out=str(tmp_path), mode_seeking=0.2)
    task = GANTask(cfg, opts, torch.device("cpu"))
    seen = []
    task.D.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    task.step(torch.rand(32, 1, 28, 28) * 2 - 1, torch.arange(32) % 4, 0)
    fake_labels = seen[1]                                             # D(real), D(fake), D(fake) for G
    assert torch.equal(fake_labels[:16], fake_labels[16:])


def test_self_conditioned_run_resumes_exactly_and_exports_an_unconditional_model(tmp_path, small_idx_dir):
    from edgegen.export import export_run, quantize_model
    from edgegen.export.onnx_io import load_model, runtime_op_counts

    base = dict(kind="gan", data=str(small_idx_dir), batch_size=32, width=8, latent_dim=16, progress=False,
                quality_samples=64, seed=0, clusters=4)
    full = train(TrainOptions(**base, out=str(tmp_path / "full"), epochs=0.5))
    train(TrainOptions(**base, out=str(tmp_path / "half"), epochs=0.25))
    resumed = train(TrainOptions(**base, out=str(tmp_path / "half"), epochs=0.5, resume=True))
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    for key, value in a["models"]["G_ema"].items():
        assert torch.equal(value, b["models"]["G_ema"][key]), key
    labels = a["cluster_labels"].long().numpy()
    freq = a["model_config"]["cluster_freq"]
    assert labels.shape == (512,) and set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.allclose(freq, np.bincount(labels) / 512) and freq == sorted(freq, reverse=True)
    assert a["train_config"]["mode_seeking"] == 0.2
    assert load_run(full.parent).model.cfg.cluster_freq == freq

    fp32 = tmp_path / "g.onnx"
    export_run(full.parent, fp32)
    model, meta = load_model(fp32)
    assert [i.name for i in model.graph.input] == ["z"] and not meta.conditional and meta.class_names == ()
    assert meta.extra["clusters"] == 4 and meta.parity_max_abs <= 1e-4
    int8 = quantize_model(fp32, tmp_path / "g.int8.onnx", "int8", force=True, speed_gate=False)
    assert runtime_op_counts(load_model(tmp_path / "g.int8.onnx")[0]).get("QLinearConv") == 3
    assert int8.extra["clusters"] == 4


@pytest.mark.parametrize("options,message", [
    ({"clusters": 1}, "--clusters must be 0 \\(off\\) or 2..1000, got 1"),
    ({"clusters": -2}, "--clusters must be 0 \\(off\\) or 2..1000, got -2"),
    ({"clusters": 4, "conditional": True}, "--clusters applies to unconditional GANs"),
    ({"clusters": 4, "kind": "vae"}, "--clusters applies to unconditional GANs"),
    ({"clusters": 100}, "512 images are too few for 100 clusters"),
])
def test_bad_cluster_options_leave_no_run(tmp_path, small_idx_dir, options, message):
    opts = TrainOptions(**{**dict(kind="gan", data=str(small_idx_dir), out=str(tmp_path / "run"), epochs=0.25,
                                  progress=False), **options})
    with pytest.raises(EdgegenError, match=message):
        train(opts)
    assert not (tmp_path / "run").exists()
