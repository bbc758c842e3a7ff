"""The k cross-validation folds of one configuration trained together, as one stacked model.

Each fold's ViT is built as ``pipeline.train.fit`` builds it (``build_model(cfg, seed=seeds[i])``); their parameters
are laid side by side in one ``(k, P)`` tensor, and one training step advances all k: the folds' batches are stacked
into ``(k, batch, 1, 28, 28)`` and the forward pass is ``torch.func.vmap(functional_call)`` over the fold axis. On
a GPU, where the seed model's steps are bound by kernel launches, this makes k small steps one step of k times the
work. On CPU it gains nothing: about as fast as sequential folds for the seed model, slower for wider models (the
attention kernel has no vmap rule there and runs once per fold; figures in bench/README.md).

Every fold sees what ``fit`` would show it, so on CPU the batched folds reproduce sequential ``fit`` calls to float
rounding (tests/test_batched.py):

- batch order from ``torch.Generator().manual_seed(seed)``, one ``randperm`` per epoch; augmentation of the fold's
  own batch with its own device generator seeded ``seed + 1``;
- ``ceil(n_k / batch_size)`` steps per epoch for a fold of ``n_k`` images. Folds of unequal size (StratifiedKFold
  gives sizes a few images apart) are padded to the longest fold's steps with zero-weight samples: each fold's loss
  is the mean over its real samples, so its gradient is fit's; a fold whose epoch has ended sits out the remaining
  steps with its weights, Adam moments and step count untouched;
- Adam/AdamW written out over the ``(k, P)`` tensor, with the formulas of ``torch.optim.Adam``'s single-tensor path
  and per-fold step counts, learning rates (``pipeline.train.lr_factor`` on the fold's own step count) and bias
  corrections. ``torch.optim.Adam`` keeps one step count per tensor, so it cannot let one fold skip a step;
- gradient clipping by each fold's own global norm; label smoothing; bf16 autocast on CUDA;
- validation through each fold's own ViT, whose parameters are views of its row of the stacked weights (no copy),
  with fit's ``evaluate`` in batches of ``eval_batch_size``: the same numbers fit reports.

``train.compile`` is not applied here: the stacked step runs eager. Dropout draws differ from ``fit``'s (fit's
dropout is not seeded either).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from pipeline.augment import augment
from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import ViT, build_model
from pipeline.train import (FitResult, TrainingAborted, TrainingDiverged, evaluate, lr_factor, resolve_device,
                            to_pixels)

FoldCallback = Callable[[int, int, dict[str, float]], None]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, which fit uses

# CPU attention has no vmap rule; PyTorch then runs it once per fold and says so on every first call.
warnings.filterwarnings("ignore", message=r".*batching rule for aten::_scaled_dot_product", category=UserWarning)


@dataclass
class _StepTable:
    """Per-step, per-fold constants of the optimizer, shape (steps in the run, k, 1): row ``g`` is step ``g`` of the
    run (epoch-major, ``max(steps per fold)`` per epoch), broadcast over the fold's parameter row. Computed in
    float64 on the host as torch.optim.Adam computes them, uploaded once: the training loop never syncs for them.
    A fold that sits a step out has step size 0 and moment weights that leave its state as it was."""

    neg_step_size: Tensor  # -lr / (1 - beta1^t)
    bias2_sqrt: Tensor     # sqrt(1 - beta2^t)
    decay: Tensor          # AdamW: 1 - lr * weight_decay; else 1
    w1: Tensor             # exp_avg.lerp_(grad, w1): 1 - beta1, or 0 when sitting out
    b2: Tensor             # exp_avg_sq * b2 + w2 * grad^2: beta2 and 1 - beta2, or 1 and 0 when sitting out
    w2: Tensor


def _step_table(cfg: TrainConfig, steps: list[int], device: torch.device) -> _StepTable:
    per_epoch = max(steps)
    factors = [lr_factor(cfg, s) for s in steps]
    rows: dict[str, list[list[float]]] = {name: [] for name in _StepTable.__dataclass_fields__}
    for epoch in range(cfg.epochs):
        for step in range(per_epoch):
            cols: dict[str, list[float]] = {name: [] for name in rows}
            for fold, fold_steps in enumerate(steps):
                active = step < fold_steps
                done = epoch * fold_steps + min(step, fold_steps - 1)  # optimizer steps the fold took before this
                lr = cfg.lr * factors[fold](done)  # what LambdaLR sets for step `done`
                t = done + 1  # Adam's step count after this step
                cols["neg_step_size"].append(-lr / (1 - BETA1**t) if active else 0.0)
                cols["bias2_sqrt"].append((1 - BETA2**t) ** 0.5)
                cols["decay"].append(1 - lr * cfg.weight_decay if active and cfg.optimizer == "adamw" else 1.0)
                cols["w1"].append(1 - BETA1 if active else 0.0)
                cols["b2"].append(BETA2 if active else 1.0)
                cols["w2"].append(1 - BETA2 if active else 0.0)
            for name, values in cols.items():
                rows[name].append(values)
    return _StepTable(**{name: torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)
                         for name, values in rows.items()})


def _stacked_forward(template: ViT) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """(parameters stacked on dim 0, batches stacked on dim 0) -> logits (k, batch, classes)."""
    return vmap(lambda params, x: functional_call(template, params, (x,)), randomness="different")


def fit_folds(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    images: Tensor,
    labels: Tensor,
    folds: Sequence[tuple[Tensor, Tensor]],
    seeds: Sequence[int],
    *,
    callback: FoldCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool | None = None,
    desc: str = "folds",
) -> list[FitResult]:
    """Train one configuration on k folds at once; fold ``i`` trains on ``images[folds[i][0]]`` from the weights
    of ``seeds[i]`` and is validated on ``images[folds[i][1]]`` after every epoch.

    Returns one FitResult per fold, as ``fit(model_cfg, train_cfg, images[train], labels[train],
    {"val": (images[val], labels[val])}, seed=seeds[i])`` would: the same history keys per epoch (train_loss,
    train_error, lr, val_loss, val_error, epoch_seconds) and ``.model`` a plain ViT holding the fold's weights.
    ``epoch_seconds`` and ``seconds`` are the wall time of the stacked run, shared by all k folds.
    ``callback(fold_index, epoch, metrics)`` is called for every fold after every epoch. ``should_stop`` is polled
    before every step (TrainingAborted); a non-finite training loss raises TrainingDiverged naming the fold (its
    0-based index is the exception's ``fold`` attribute).
    """
    k = len(folds)
    if k == 0 or len(seeds) != k:
        raise ValueError(f"fit_folds needs one seed per fold; got {k} folds and {len(seeds)} seeds")
    device = resolve_device(train_cfg.device)
    bs = train_cfg.batch_size
    train_idx = [torch.as_tensor(tr, dtype=torch.long) for tr, _ in folds]
    sizes = [len(idx) for idx in train_idx]
    if min(sizes) == 0:
        raise ValueError(f"fit_folds: fold {sizes.index(0) + 1} has no training images")
    steps = [math.ceil(n / bs) for n in sizes]
    per_epoch = max(steps)

    models = [build_model(model_cfg, seed=seed).to(device) for seed in seeds]
    template = copy.deepcopy(models[0])  # structure and buffers for the stacked forward; its own weights unused
    names = [name for name, _ in template.named_parameters()]
    shapes = [p.shape for p in template.parameters()]
    numels = [p.numel() for p in template.parameters()]
    weights = torch.stack([parameters_to_vector(m.parameters()) for m in models]).detach().requires_grad_()  # (k, P)
    for model, row in zip(models, weights.detach()):  # each fold's ViT reads its row of the stacked weights
        for p, piece, shape in zip(model.parameters(), row.split(numels), shapes):
            p.data = piece.view(shape)
    exp_avg, exp_avg_sq = torch.zeros_like(weights), torch.zeros_like(weights)
    table = _step_table(train_cfg, steps, device)
    forward = _stacked_forward(template)

    images, labels = images.to(device), labels.to(device)
    vals = [(images[torch.as_tensor(va, device=device)], labels[torch.as_tensor(va, device=device)])
            for _, va in folds]
    shufflers = [torch.Generator().manual_seed(seed) for seed in seeds]
    augmenters = ([torch.Generator(device=device).manual_seed(seed + 1) for seed in seeds]
                  if train_cfg.augment.active else None)
    # real samples of each fold in each step of an epoch: bs, then the remainder, then 0 once the fold is done
    counts = [[max(0, min(bs, n - s * bs)) for n in sizes] for s in range(per_epoch)]
    count_table = torch.tensor(counts, dtype=torch.float32, device=device)  # (per_epoch, k)
    real = torch.arange(bs, device=device) < count_table.unsqueeze(-1)  # (per_epoch, k, bs)
    bf16 = train_cfg.precision == "bf16" and device.type == "cuda"
    histories: list[list[dict[str, float]]] = [[] for _ in range(k)]
    bar = tqdm(total=train_cfg.epochs * per_epoch, desc=desc, unit="step", leave=False,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for epoch in range(1, train_cfg.epochs + 1):
            epoch_start = time.perf_counter()
            order = torch.zeros(k, per_epoch * bs, dtype=torch.long)  # padding points at image 0, weight 0
            for f in range(k):
                order[f, :sizes[f]] = train_idx[f][torch.randperm(sizes[f], generator=shufflers[f])]
            order = order.to(device)
            loss_sum = torch.zeros(k, device=device)
            wrong = torch.zeros(k, device=device, dtype=torch.long)
            for s in range(per_epoch):
                if should_stop is not None and should_stop():
                    raise TrainingAborted(f"{desc}: stopped in epoch {epoch} because the study is stopping")
                idx = order[:, s * bs:(s + 1) * bs]
                x, y, mask = to_pixels(images[idx]), labels[idx], real[s]
                if augmenters is not None:
                    for f in range(k):
                        if counts[s][f]:
                            x[f, :counts[s][f]] = augment(x[f, :counts[s][f]], train_cfg.augment, augmenters[f])
                params = {name: piece.view(k, *shape)
                          for name, piece, shape in zip(names, weights.split(numels, dim=1), shapes)}
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = forward(params, x).float()
                    per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                                 label_smoothing=train_cfg.label_smoothing).view(k, -1)
                n_real = count_table[s]
                loss = per_sample.masked_fill(~mask, 0.0).sum(1) / n_real.clamp(min=1)  # each fold's mean loss
                weights.grad = None
                loss.sum().backward()
                _adam_step(weights, exp_avg, exp_avg_sq, train_cfg, table, (epoch - 1) * per_epoch + s)
                loss_sum += loss.detach() * n_real
                wrong += ((logits.detach().argmax(-1) != y) & mask).sum(1)
                bar.update(1)
            train_loss = [total / n for total, n in zip(loss_sum.tolist(), sizes)]
            train_error = [count / n for count, n in zip(wrong.tolist(), sizes)]
            for f, value in enumerate(train_loss):
                if not math.isfinite(value):
                    diverged = TrainingDiverged(f"{desc} fold {f + 1}/{k}: training loss is {value} in epoch "
                                                f"{epoch} (train.lr={train_cfg.lr}); lower the learning rate")
                    diverged.fold = f
                    raise diverged
            epoch_metrics = []
            for f in range(k):
                metrics = {"train_loss": train_loss[f], "train_error": train_error[f],
                           "lr": train_cfg.lr * lr_factor(train_cfg, steps[f])(epoch * steps[f])}
                metrics["val_loss"], metrics["val_error"] = evaluate(models[f], *vals[f],
                                                                     train_cfg.eval_batch_size, device)
                epoch_metrics.append(metrics)
            seconds = time.perf_counter() - epoch_start
            for f, metrics in enumerate(epoch_metrics):
                metrics["epoch_seconds"] = seconds
                histories[f].append(metrics)
                if callback is not None:
                    callback(f, epoch, metrics)
            bar.set_postfix({"val_error": " ".join(f"{m['val_error']:.4f}" for m in epoch_metrics)})
    finally:
        bar.close()
    total = time.perf_counter() - start
    for model in models:  # own storage, detached from the stacked tensor
        for p in model.parameters():
            p.data = p.data.clone()
        model.eval()
    return [FitResult(model=model, history=history, seconds=total, device=str(device))
            for model, history in zip(models, histories)]


@torch.no_grad()
def _adam_step(weights: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, cfg: TrainConfig, table: _StepTable,
               g: int) -> None:
    """One Adam/AdamW step of every fold's row of ``weights`` (k, P), with step ``g``'s per-fold constants;
    clipping first (each fold's own global norm), as fit clips before ``optimizer.step()``."""
    grad = weights.grad
    if cfg.grad_clip:
        norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        grad.mul_((cfg.grad_clip / (norm + 1e-6)).clamp_(max=1.0))
    if cfg.weight_decay and cfg.optimizer == "adam":
        grad = grad.add(weights, alpha=cfg.weight_decay)
    if cfg.weight_decay and cfg.optimizer == "adamw":
        weights.mul_(table.decay[g])
    exp_avg.lerp_(grad, table.w1[g])
    exp_avg_sq.mul_(table.b2[g]).addcmul_(grad, grad * table.w2[g])
    denom = exp_avg_sq.sqrt().div_(table.bias2_sqrt[g]).add_(EPS)
    weights.addcmul_(exp_avg / denom, table.neg_step_size[g])
