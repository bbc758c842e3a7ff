"""Inference throughput on CPU: ONNX Runtime vs PyTorch eager, same weights, same number of cores.

    .venv/bin/python bench/inference.py                  # seed model (3 blocks, MLP 16, width 8), random weights
    .venv/bin/python bench/inference.py --threads 2 1 --batches 1 1024 --seconds 1.0 --rounds 7

Variants, each given the same float32 batch already in memory:
- PyTorch eager: ``model(x)`` under torch.inference_mode, torch.set_num_threads(N). The baseline.
- ORT one call: the file export_onnx writes (standard ONNX: what is registered, served and predicted with), one
  ``session.run`` over the whole batch with intra_op_num_threads=N.
- ORT classifier: the same file through ``pipeline.inference.OnnxClassifier(threads=N)``, what ``vitflow predict``
  and ``vitflow evaluate`` run: a large batch is cut into 64-image chunks run N at a time on one-thread sessions.
- ORT fused classifier: the ONNX Runtime-only rewrite (pipeline/ort_optimize.py: one com.microsoft.Attention per
  block, SkipLayerNormalization) through the same classifier.
- PyTorch chunked: PyTorch given the same 64-image chunks (a fairness check: it does not gain from them).
Inter-op threads are 1 everywhere. Warm-up runs are excluded. The machine may be shared, so each variant is timed
in ``rounds`` interleaved rounds of ``seconds`` each and the median round is reported. Ratios are against PyTorch
eager with the same N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.export import export_onnx  # noqa: E402
from pipeline.inference import CPU_CHUNK, OnnxClassifier  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.ort_optimize import optimize_for_onnxruntime  # noqa: E402


def ort_session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def rate(fn, batch: int, seconds: float) -> float:
    """Images per second of ``fn`` called repeatedly for about ``seconds``."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 1024])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed round per variant")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per variant (median reported)")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--mlp", type=int, default=16)
    args = parser.parse_args(argv)

    cfg = load_config("seed").model.model_copy(update={"depth": args.depth, "mlp_hidden": args.mlp})
    model = build_model(cfg, seed=0).eval()
    torch.set_num_interop_threads(1)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vitflow-bench-") as tmp:
        exported = Path(tmp) / "vit.onnx"
        export_onnx(model, exported, torch.from_numpy(rng.random((64, 1, 28, 28), dtype=np.float32)))
        fused = optimize_for_onnxruntime(exported, Path(tmp) / "vit.ort.onnx", cfg.heads, cfg.dim)
        print(f"# {cpu_name()}, {os.cpu_count()} logical CPUs; torch {torch.__version__}, onnxruntime "
              f"{ort.__version__}; model: {cfg.depth} blocks, MLP {cfg.mlp_hidden}, width {cfg.dim}, {cfg.heads} "
              f"heads, {count_parameters(model):,} parameters; median of {args.rounds} rounds x "
              f"{args.seconds:.1f} s")
        columns = ["PyTorch eager", "ORT one call", "ORT classifier", "ORT fused classifier", "PyTorch chunked"]
        print("| threads | batch | " + " | ".join(columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for threads in args.threads:
            torch.set_num_threads(threads)
            session = ort_session(exported, threads)
            classifier = OnnxClassifier(exported, device="cpu", threads=threads)
            fused_classifier = OnnxClassifier(fused, device="cpu", threads=threads)
            for batch in args.batches:
                x = rng.random((batch, 1, 28, 28), dtype=np.float32)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    expected = model(xt).numpy()
                runs = {
                    "PyTorch eager": lambda: model(xt),
                    "ORT one call": lambda: session.run(None, {"pixels": x}),
                    "ORT classifier": lambda: classifier.logits(x),
                    "ORT fused classifier": lambda: fused_classifier.logits(x),
                    "PyTorch chunked": lambda: [model(xt[i:i + CPU_CHUNK]) for i in range(0, batch, CPU_CHUNK)],
                }
                outputs = {"ORT one call": runs["ORT one call"]()[0], "ORT classifier": runs["ORT classifier"](),
                           "ORT fused classifier": runs["ORT fused classifier"]()}
                for name, got in outputs.items():
                    assert np.abs(got - expected).max() < 1e-4, f"{name}: ORT and PyTorch disagree"
                rates: dict[str, list[float]] = {name: [] for name in runs}
                with torch.inference_mode():
                    for fn in runs.values():  # warm-up, not timed
                        for _ in range(5 if batch > 1 else 50):
                            fn()
                    for _ in range(args.rounds):
                        for name, fn in runs.items():
                            rates[name].append(rate(fn, batch, args.seconds))
                med = {name: statistics.median(values) for name, values in rates.items()}
                base = med["PyTorch eager"]
                cells = [f"{base:,.0f}"] + [f"{med[c]:,.0f} ({med[c] / base:.2f}x)" for c in columns[1:]]
                print(f"| {threads} | {batch} | " + " | ".join(cells) + " |", flush=True)
            classifier.close()
            fused_classifier.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
