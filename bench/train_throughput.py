"""Training throughput: the project's ``fit`` against a bare PyTorch loop, and batched folds against sequential ones.

    .venv/bin/python bench/train_throughput.py                          # CPU, 10,000 images, 1 epoch, 3 repeats
    .venv/bin/python bench/train_throughput.py --device cuda --images 20000 --repeats 5

The bare loop is what a person would write by hand for the same job: the model from ``build_model`` with the same
configuration and seed, the uint8 images resident on the device, the same batch size and optimizer (Adam, fused on
CUDA, as fit makes it), ``randperm`` indexing, ``to_pixels``, ``cross_entropy``, ``zero_grad(set_to_none=True)``,
``backward``, ``step``; nothing else. ``fit`` runs as the study calls it (a ``should_stop`` poll before every
batch, per-epoch metrics, progress bar off), without evaluation sets. Both start from the host tensors, so both
pay for building the model and moving the data. Images per second = training images x epochs / wall time (CUDA
synchronised). The variants alternate within each repeat, first one first then the other (the machine may be
shared, and the second of a pair ran measurably slower here), and the median repeat is reported; one untimed
warm-up run of each comes first.

Batched folds (``pipeline.batched.fit_folds``, 3 folds of ``--images`` training images and half as many
validation images each) are timed against the same 3 folds trained one after another by ``fit`` with their
validation set; "3 batched / 1 fold" is the batched run's time over one sequential fold's (1.0 would mean the
other two folds come free, 3.0 no gain).

On CUDA every ``fit`` and batched row comes twice: "(CUDA graph)" as the study runs it (``train.cuda_graph=auto``:
each step replayed as one captured graph) and "(eager)" with ``train.cuda_graph=off``, the same kernels launched
one by one, which is what the bare loop does; ``--cuda-graph on`` or ``off`` times only one of the two.
``--norm both`` adds "(CUDA graph, F.layer_norm)" rows: the captured steps with every LayerNorm through
``F.layer_norm``, as before ``pipeline.batched._ShortRowNorm`` took the models of at most ``SHORT_ROW_NORM_DIM``
features (the seed model's 8) on CUDA.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.machine import cpu_name  # noqa: E402
from pipeline import batched as batched_module  # noqa: E402
from pipeline.batched import fit_folds  # noqa: E402
from pipeline.config import DataConfig, ModelConfig, TrainConfig  # noqa: E402
from pipeline.data import load, stratified_folds  # noqa: E402
from pipeline.model import build_model, count_parameters  # noqa: E402
from pipeline.train import fit, resolve_device, to_pixels  # noqa: E402

MODELS = {  # name: (label, configuration)
    "seed": ("seed (dim 8, 3 blocks, MLP 32)", ModelConfig(dim=8, heads=2, depth=3, mlp_hidden=32, pos_base=100)),
    "bigger": ("bigger (dim 64, 4 blocks, MLP 128)",
               ModelConfig(dim=64, heads=4, depth=4, mlp_hidden=128, pos_base=100)),
}
SEED = 0


def bare_loop(model_cfg: ModelConfig, train_cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor,
              device: torch.device) -> None:
    """The hand-written baseline: nothing but the training step."""
    model = build_model(model_cfg, seed=SEED).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, fused=device.type == "cuda")
    images, labels = images.to(device), labels.to(device)
    shuffler = torch.Generator().manual_seed(SEED)
    n, bs = len(labels), train_cfg.batch_size
    for _ in range(train_cfg.epochs):
        order = torch.randperm(n, generator=shuffler).to(device)
        for i in range(0, n, bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(model(to_pixels(images[idx])), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def with_norm_dim(dim: int, fn: Callable[[], object]) -> Callable[[], object]:
    """fn, run with ``pipeline.batched.SHORT_ROW_NORM_DIM`` set to dim (0: every LayerNorm through F.layer_norm)."""
    def run() -> object:
        kept, batched_module.SHORT_ROW_NORM_DIM = batched_module.SHORT_ROW_NORM_DIM, dim
        try:
            return fn()
        finally:
            batched_module.SHORT_ROW_NORM_DIM = kept
    return run


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], object]], warmups: dict[str, Callable[[], object]],
                repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per variant over ``repeats`` rounds, after one untimed warm-up of each. The order within a
    round alternates (A B, B A, ...): whichever runs second in a round is not always the same variant."""
    for fn in warmups.values():
        timed(fn, device)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(repeats):
        names = list(variants) if round_index % 2 == 0 else list(reversed(variants))
        for name in names:
            seconds[name].append(timed(variants[name], device))
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--images", type=int, default=10_000, help="training images per run (and per fold)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--no-batched", action="store_true", help="skip batched folds vs sequential folds")
    parser.add_argument("--no-fit", action="store_true", help="skip fit vs the bare loop (only the folds)")
    parser.add_argument("--cuda-graph", choices=["both", "on", "off"], default="both",
                        help="on CUDA: time the captured-graph rows, the eager ones, or both (default)")
    parser.add_argument("--norm", choices=["default", "both"], default="default",
                        help="on CUDA, both: also time the captured-graph rows with every LayerNorm through "
                             "F.layer_norm (pipeline.batched.SHORT_ROW_NORM_DIM=0)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one batched run of 1 and of 3 folds of the first model (torch.profiler, "
                             "top kernels by device time): what grows with the number of folds")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    data = load(DataConfig())
    folds_of = int(args.images * 1.5)  # 3 stratified folds: each trains on `images`, validates on images / 2
    x, y = data.train_images[:folds_of], data.train_labels[:folds_of]
    folds = stratified_folds(y, 3, SEED)
    seeds = [1000, 2000, 3000]
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, device=device.type)
    stop = threading.Event()

    gpu = f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    print(f"# {datetime.date.today()}, {cpu_name()} ({os.cpu_count()} logical CPUs){gpu}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread(s); {args.images:,} images x {args.epochs} epoch(s), batch "
          f"{args.batch_size}, median of {args.repeats} alternating repeats\n", flush=True)
    fit_rows = ["| device | model | parameters | bare loop img/s | fit img/s | fit / bare |",
                "|---|---|---|---|---|---|"]
    fold_rows = ["| device | model | 1 fold s | 3 sequential s | 3 batched s | 3 batched / 1 fold | "
                 "sequential / batched |", "|---|---|---|---|---|---|---|"]
    warm_folds = [(tr[:4 * args.batch_size], va[:args.batch_size]) for tr, va in folds]
    # On CUDA, fit and the batched folds replay each step as a captured CUDA graph (train.cuda_graph=auto); the
    # same code with cuda_graph=off is timed beside it, the eager loop the bare one compares with kernel for kernel.
    # Each mode: (configuration, SHORT_ROW_NORM_DIM).
    default_dim = batched_module.SHORT_ROW_NORM_DIM
    modes = {"": (train_cfg, default_dim)}
    if device.type == "cuda":
        modes = {" (CUDA graph)": (train_cfg, default_dim),
                 " (eager)": (train_cfg.model_copy(update={"cuda_graph": "off"}), default_dim)}
        if args.cuda_graph != "both":
            modes = dict([list(modes.items())[0 if args.cuda_graph == "on" else 1]])
        if args.norm == "both" and args.cuda_graph != "off":
            modes[" (CUDA graph, F.layer_norm)"] = (train_cfg, 0)
    for label, model_cfg in (MODELS[name] for name in args.models):
        params = count_parameters(build_model(model_cfg))
        xs, ys = x[folds[0][0]], y[folds[0][0]]
        few = slice(0, 4 * args.batch_size)
        modes_timed = {} if args.no_fit else modes
        variants = {} if args.no_fit else {"bare": lambda: bare_loop(model_cfg, train_cfg, xs, ys, device)}
        warmups = {"bare": lambda: bare_loop(model_cfg, train_cfg, xs[few], ys[few], device)}
        for mode, (cfg, dim) in modes_timed.items():
            variants[f"fit{mode}"] = with_norm_dim(dim, lambda cfg=cfg: fit(
                model_cfg, cfg, xs, ys, seed=SEED, progress=False, should_stop=stop.is_set))
            warmups[f"fit{mode}"] = with_norm_dim(dim, lambda cfg=cfg: fit(
                model_cfg, cfg, xs[few], ys[few], seed=SEED, progress=False))
        med = interleaved(variants, warmups, args.repeats, device) if variants else {}
        rate = {name: len(ys) * args.epochs / s for name, s in med.items()}
        for mode in modes_timed:
            fit_rows.append(f"| {device.type} | {label}{mode} | {params:,} | {rate['bare']:,.0f} | "
                            f"{rate[f'fit{mode}']:,.0f} | {rate[f'fit{mode}'] / rate['bare']:.2f} |")
            print(fit_rows[-1], file=sys.stderr, flush=True)  # progress; the tables go to stdout at the end
        if args.no_batched:
            continue
        for mode, (cfg, dim) in modes.items():
            def sequential(folds: list = folds, cfg: TrainConfig = cfg) -> list:
                return [fit(model_cfg, cfg, x[tr], y[tr], {"val": (x[va], y[va])}, seed=s, progress=False,
                            should_stop=stop.is_set) for (tr, va), s in zip(folds, seeds)]

            def batched(folds: list = folds, cfg: TrainConfig = cfg) -> list:
                return fit_folds(model_cfg, cfg, x, y, folds, seeds, progress=False, should_stop=stop.is_set)

            med = interleaved({"sequential": with_norm_dim(dim, sequential), "batched": with_norm_dim(dim, batched)},
                              {"sequential": with_norm_dim(dim, lambda: sequential(warm_folds)),
                               "batched": with_norm_dim(dim, lambda: batched(warm_folds))},
                              args.repeats, device)
            one = med["sequential"] / 3
            fold_rows.append(f"| {device.type} | {label}{mode} | {one:.2f} | {med['sequential']:.2f} | "
                             f"{med['batched']:.2f} | {med['batched'] / one:.2f} | "
                             f"{med['sequential'] / med['batched']:.2f} |")
            print(fold_rows[-1], file=sys.stderr, flush=True)
    if not args.no_fit:
        print("\n".join(fit_rows))
    if not args.no_batched:
        print("\n" + "\n".join(fold_rows))
    if args.profile:
        label, model_cfg = MODELS[args.models[0]]
        for k in (1, 3):
            print(f"\n## profile: {label}, {k} fold(s) stacked, {args.images:,} images x {args.epochs} epoch(s)\n")
            print("```\n" + profile_folds(model_cfg, train_cfg, x, y, folds[:k], seeds[:k], device) + "\n```")
    return 0


def profile_folds(model_cfg: ModelConfig, train_cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, folds: list,
                  seeds: list[int], device: torch.device) -> str:
    """One fit_folds run (after an untimed one) under torch.profiler: the top operators and kernels by device
    time (CPU time on a CPU run)."""
    from torch.profiler import ProfilerActivity, profile

    fit_folds(model_cfg, train_cfg, x, y, folds, seeds, progress=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        fit_folds(model_cfg, train_cfg, x, y, folds, seeds, progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60)


if __name__ == "__main__":
    sys.exit(main())
