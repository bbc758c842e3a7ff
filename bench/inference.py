"""Inference throughput on CPU: ONNX Runtime vs PyTorch eager, same weights, same thread count.

    .venv/bin/python bench/inference.py                  # seed model (3 blocks, MLP 16, width 8), random weights
    .venv/bin/python bench/inference.py --threads 2 1 --batches 1 1024 --seconds 1.0 --rounds 7

Variants: PyTorch eager (torch.inference_mode, eval); ONNX Runtime on the file export_onnx writes (standard ONNX,
what is registered and served); ONNX Runtime on the ORT-specific rewrite (pipeline/ort_optimize.py: one
com.microsoft.Attention per block, SkipLayerNormalization). Thread count N: torch.set_num_threads(N) and ORT's
intra_op_num_threads=N (inter-op 1 for both). Warm-up runs are excluded. The machine is shared, so each variant is
timed in ``rounds`` interleaved rounds of ``seconds`` each and the median round is reported (max as a check).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.export import export_onnx  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.ort_optimize import optimize_for_onnxruntime  # noqa: E402


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


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
        header = (f"{'threads':>7}  {'batch':>5}  {'PyTorch eager':>13}  {'ORT exported':>12}  {'ratio':>5}  "
                  f"{'ORT fused':>9}  {'ratio':>5}")
        print(header)
        for threads in args.threads:
            torch.set_num_threads(threads)
            sessions = {"exported": ort_session(exported, threads), "fused": ort_session(fused, threads)}
            for batch in args.batches:
                x = rng.random((batch, 1, 28, 28), dtype=np.float32)
                xt = torch.from_numpy(x)
                with torch.inference_mode():
                    expected = model(xt).numpy()
                runs = {"torch": lambda: model(xt)}
                for name, session in sessions.items():
                    got = session.run(None, {"pixels": x})[0]
                    assert np.abs(got - expected).max() < 1e-4, f"{name}: ORT and PyTorch disagree"
                    runs[name] = (lambda s: lambda: s.run(None, {"pixels": x}))(session)
                rates: dict[str, list[float]] = {name: [] for name in runs}
                with torch.inference_mode():
                    for fn in runs.values():  # warm-up, not timed
                        for _ in range(5 if batch > 1 else 50):
                            fn()
                    for _ in range(args.rounds):
                        for name, fn in runs.items():
                            rates[name].append(rate(fn, batch, args.seconds))
                med = {name: statistics.median(values) for name, values in rates.items()}
                print(f"{threads:>7}  {batch:>5}  {med['torch']:>13,.0f}  {med['exported']:>12,.0f}  "
                      f"{med['exported'] / med['torch']:>5.2f}  {med['fused']:>9,.0f}  "
                      f"{med['fused'] / med['torch']:>5.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
