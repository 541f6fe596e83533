"""Runtime benchmark: PyTorch eager vs onnxruntime fp32/int8/fp16, cold start, and end-to-end
``generate`` to PNG against bare int8 inference; writes the ``runtime`` section of docs/benchmarks.md.

    python benchmarks/runtime_benchmark.py                      # default 32x32 GAN architecture
    python benchmarks/runtime_benchmark.py --model m.onnx --torch RUN_DIR

Without ``--model`` it builds the default GAN architecture (GANConfig defaults) with seeded random
weights, exports it and quantizes it (``force``: the quality gates are about trained weights; speed
does not depend on the weights' values). Only the text between ``<!-- runtime:start -->`` and
``<!-- runtime:end -->`` is replaced; other sections of the file are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from docs_section import write_section

ROOT = Path(__file__).resolve().parents[1]


def build_default_models(work: Path) -> tuple[Path, Path]:
    """Seeded default-architecture GAN run -> fp32, int8, fp16 ONNX files; returns (fp32 path, run dir)."""
    import torch

    from edgegen.export import export_run
    from edgegen.export.quantize import quantize_model
    from edgegen.training.checkpoint import save_checkpoint
    from edgegen.training.models.gan import GANConfig, Generator

    torch.manual_seed(0)
    cfg = GANConfig()
    gen = Generator(cfg)
    gen.train()
    with torch.no_grad():                              # give BatchNorm realistic running statistics
        for _ in range(4):
            gen(torch.randn(256, cfg.latent_dim))
    gen.eval()
    run = work / "run"
    run.mkdir()
    save_checkpoint(run / "last.pt", {"kind": "gan", "models": {"G_ema": gen.state_dict()},
                                      "model_config": cfg.to_dict(), "step": 0, "metrics": {},
                                      "data": {"name": "untrained", "fingerprint": "", "class_names": []}})
    fp32 = work / "gan.onnx"
    export_run(run, fp32)
    for mode in ("int8", "fp16"):
        quantize_model(fp32, work / f"gan.{mode}.onnx", mode=mode, force=True, speed_gate=False)
    return fp32, run


def generate_throughput(model: Path, work: Path, n: int, batch: int, threads: int) -> dict:
    """End-to-end ``run_generate`` to PNG (inference + encoding + writing + manifest), images/s."""
    from edgegen.runtime.pipeline import run_generate

    res = run_generate(model, work / "png", n, seed=0, batch_size=batch, threads=threads, progress=False)
    return {"n": n, "batch": batch, "seconds": res.seconds, "images_per_s": res.images_per_s}


def section(res: dict, e2e: dict, bare: dict, table: str, source: str) -> str:
    m = res["machine"]
    ratio = e2e["images_per_s"] / bare["images_per_s"]
    return "\n".join([
        "## Runtime: inference speed, cold start, end-to-end generation",
        "",
        f"Machine: {m['cpu']}, {m['cores']} usable cores ({', '.join(m['isa'])}); onnxruntime {m['onnxruntime']}, "
        f"Python {m['python']}; {res['threads']} threads for every engine; measured {time.strftime('%Y-%m-%d')} "
        f"with `python benchmarks/runtime_benchmark.py` ({source}). The machine is shared with other jobs, so "
        "figures carry noise of tens of percent; ratios within one run are the comparable quantity.",
        "",
        table,
        "",
        f"End-to-end `edgegen generate` to PNG (int8, batch {e2e['batch']}, {e2e['n']:,} images, manifest and "
        f"atomic writes included): **{e2e['images_per_s']:,.0f} images/s** vs bare int8 inference at the same "
        f"batch {bare['images_per_s']:,.0f} images/s = **{100 * ratio:.0f} %** (target ≥ 70 %: "
        f"{'met' if ratio >= 0.7 else 'missed'}).",
    ])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="fp32 .onnx (siblings <base>.int8/.fp16.onnx used when present)")
    ap.add_argument("--torch", help="run folder for the PyTorch eager rows")
    ap.add_argument("--threads", type=int, help="default: all usable cores")
    ap.add_argument("--seconds", type=float, default=2.0, help="timing per row")
    ap.add_argument("-n", type=int, default=20_000, help="images for the end-to-end generate run")
    ap.add_argument("--batch", type=int, default=256, help="generate batch size")
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--json", help="also write all figures here")
    args = ap.parse_args()

    from edgegen.runtime.bench import bench_onnx, find_variants, format_table, run_bench
    from edgegen.runtime.generator import cpu_count

    threads = args.threads or cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.model:
            model, run, source = Path(args.model), args.torch, f"model {Path(args.model).name}"
        else:
            model, run = build_default_models(work)
            source = "default GAN architecture, 32×32 gray, seeded untrained weights"
        res = run_bench(model, torch_run=run, threads=threads, seconds=args.seconds)
        variants = find_variants(model)
        int8 = variants.get("int8", model)
        bare = bench_onnx(int8, threads, (args.batch,), args.seconds)[0]
        e2e = generate_throughput(int8, work, args.n, args.batch, threads)
    table = format_table(res)
    print(table)
    text = section(res, e2e, bare, table, source)
    write_section("runtime", text, Path(args.doc))
    if args.json:
        Path(args.json).write_text(json.dumps({"bench": res, "generate": e2e, "bare": bare}, indent=2))
    print(f"e2e {e2e['images_per_s']:.0f} img/s vs bare {bare['images_per_s']:.0f} img/s; wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
