"""One training loop for cross-validation folds and the final retraining, on in-memory tensors."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import build_model

EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the epoch and the learning rate."""


class TrainingAborted(RuntimeError):
    """Training was stopped from outside (the study failed or was interrupted)."""


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=auto or cpu")
    return torch.device(name)


def configure_threads(threads: int | None, concurrency: int = 1) -> int:
    """Intra-op threads so that concurrent tasks together use the cores once, not oversubscribe them."""
    n = threads or max(1, (os.cpu_count() or 1) // max(1, concurrency))
    torch.set_num_threads(n)
    return n


def to_pixels(images: Tensor) -> Tensor:
    """uint8 images -> float32 intensities in [0, 1] (the model normalises internally)."""
    return images.float().div_(255.0)


@torch.inference_mode()
def predict_logits(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    was_training = model.training
    model.eval()
    out = [model(to_pixels(images[i:i + batch_size].to(device, non_blocking=True))).float()
           for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def evaluate(model: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 4096,
             device: torch.device | None = None) -> tuple[float, float]:
    """(mean cross-entropy, misclassification error) of ``model`` on the given images."""
    device = device or next(model.parameters()).device
    logits = predict_logits(model, images, batch_size, device)
    labels = labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item()
    error = (logits.argmax(1) != labels).float().mean().item()
    return loss, error


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    return torch.optim.Adam(model.parameters(), **kwargs)


def fit(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    train_images: Tensor,
    train_labels: Tensor,
    eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
    *,
    seed: int | None = None,
    callback: EpochCallback | None = None,
    desc: str = "train",
    progress: bool | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FitResult:
    """Train a fresh model; after every epoch report train_loss/train_error (means over the epoch's batches)
    and <name>_loss/<name>_error for each evaluation set, to ``callback`` and into the returned history.

    Deterministic on CPU for a given ``seed`` (weights and batch order both derive from it). ``should_stop`` is
    polled before every batch; when it returns True, TrainingAborted is raised.
    """
    seed = train_cfg.seed if seed is None else seed
    device = resolve_device(train_cfg.device)
    model = build_model(model_cfg, seed=seed).to(device)
    optimizer = _optimizer(model, train_cfg, device)
    images, labels = train_images.to(device), train_labels.to(device)
    evals = {name: (x.to(device), y.to(device)) for name, (x, y) in (eval_sets or {}).items()}
    shuffler = torch.Generator().manual_seed(seed)
    n, bs = len(labels), train_cfg.batch_size
    steps = math.ceil(n / bs)
    result = FitResult(model=model, device=str(device))
    bar = tqdm(total=train_cfg.epochs * steps, desc=desc, unit="batch", leave=False,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        for epoch in range(1, train_cfg.epochs + 1):
            epoch_start = time.perf_counter()
            model.train()
            order = torch.randperm(n, generator=shuffler).to(device)
            loss_sum = torch.zeros((), device=device)
            wrong = torch.zeros((), device=device, dtype=torch.long)
            for i in range(0, n, bs):
                if should_stop is not None and should_stop():
                    raise TrainingAborted(f"{desc}: stopped in epoch {epoch} because the study is stopping")
                idx = order[i:i + bs]
                x, y = to_pixels(images[idx]), labels[idx]
                logits = model(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                wrong += (logits.detach().argmax(1) != y).sum()
                bar.update(1)
            metrics = {"train_loss": loss_sum.item() / n, "train_error": wrong.item() / n}
            if not math.isfinite(metrics["train_loss"]):
                raise TrainingDiverged(f"{desc}: training loss is {metrics['train_loss']} in epoch {epoch} "
                                       f"(train.lr={train_cfg.lr}); lower the learning rate")
            for name, (x, y) in evals.items():
                metrics[f"{name}_loss"], metrics[f"{name}_error"] = evaluate(model, x, y, train_cfg.eval_batch_size,
                                                                             device)
            metrics["epoch_seconds"] = time.perf_counter() - epoch_start
            result.history.append(metrics)
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k.endswith("error")})
            if callback is not None:
                callback(epoch, metrics)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    model.eval()
    return result
