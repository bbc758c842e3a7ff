"""Where a preset's training step spends its time: `fit` of the preset's model with its recipe on a slice of the
training images, timed, then again under torch.profiler, with the top kernels by device time.

    .venv/bin/python bench/profile_step.py --config strong                # on a GPU: 30,720 images, 60 steps
    .venv/bin/python bench/profile_step.py --config strong --images 2048 --set train.batch_size=128   # CPU, small

The strong preset's retraining took 1.03 s per epoch of 118 steps on an H200 (2026-12-04): 8.7 ms a step, at
about 20 TFLOP/s, a few percent of the card's bf16 rate. Which kernels fill those milliseconds decides what could
give it more epochs within its 5 minutes. Each ``fit`` call here is what the retraining runs (on CUDA, by default,
one captured CUDA graph replayed per step: the profiler lists the kernels inside it), one epoch over ``--images``
images, no evaluation sets. The first call is an untimed warm-up (cuDNN's algorithm choice, the allocator); the
timed one gives seconds per step, capture included; the profiled one gives the table. The data root is the project's
setting ($VITFLOW_DATA_DIR, else the preset's data.root).
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.config import ConfigError, load_config  # noqa: E402
from pipeline.data import load  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.train import configure_threads, fit, resolve_device  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="strong", help="preset name or YAML path (default: strong)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    parser.add_argument("--images", type=int, default=30_720, help="training images per fit call (one epoch)")
    parser.add_argument("--rows", type=int, default=25, help="kernels listed (default 25)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: every core)")
    args = parser.parse_args(argv)
    if args.images < 1 or args.rows < 1:
        parser.error("--images and --rows must be at least 1")
    try:
        cfg = load_config(args.config, [*args.set, "train.epochs=1"])
    except ConfigError as exc:
        parser.error(str(exc))
    configure_threads(args.threads)
    device = resolve_device(cfg.train.device)
    data = load(cfg.data)
    x, y = data.train_images[:args.images], data.train_labels[:args.images]
    steps = math.ceil(len(y) / cfg.train.batch_size)

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit(cfg.model, cfg.train, x, y, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    seconds = run()
    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    print(f"# {datetime.date.today()}, {cfg.name} {' '.join(args.set)}: "
          f"{count_parameters(build_model(cfg.model)):,} parameters, {len(y):,} images = {steps} steps of "
          f"{cfg.train.batch_size}, precision {cfg.train.precision}, cuda_graph {cfg.train.cuda_graph}; "
          f"{device.type}{gpu}; torch {torch.__version__}\n")
    print(f"fit, one epoch: {seconds:.3f} s, {1000 * seconds / steps:.2f} ms per step (capture and warm-up steps "
          f"included), {len(y) / seconds:,.0f} images/s\n")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("```\n" + prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70) + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
