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
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from pipeline.augment import augment
from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import build_model

EpochCallback = Callable[[int, dict[str, float]], None]
PlanCallback = Callable[[int, str], None]  # (epochs the run will train, why)
PLAN_AFTER_EPOCHS = 2  # a time limit sets the epoch count after these: the first has one-time costs (warm-up, capture)
PACE_MARGIN = 1.03  # epochs planned at 3% slower than measured


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


def ema_weight(decay: float, updates: int) -> float:
    """The weight of the current weights in the moving average's update after ``updates`` earlier ones: 1 for the first
    (a copy), then 1 - min(decay, (1 + n) / (10 + n)), the warm-up of TensorFlow's ExponentialMovingAverage (with
    num_updates) that timm's ModelEma uses too. Early on, the average follows the weights closely instead of holding
    on to the first epochs' weights; the decay reaches ``decay`` after (10 * decay - 1) / (1 - decay) updates."""
    return 1.0 if updates == 0 else 1 - min(decay, (1 + updates) / (10 + updates))


def _ema_update(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """AveragedModel's ``multi_avg_fn`` with ``ema_weight``'s warm-up (AveragedModel copies the first update itself).
    AveragedModel hands over its update count on the parameters' device, so on CUDA reading it waits for the step: a
    sync per step in fit's eager CUDA path (compile or dropout); the captured path (pipeline.batched) has none."""

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], updates: Tensor) -> None:
        torch._foreach_lerp_(averaged, current, ema_weight(decay, int(updates)))

    return update


def _optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if device.type == "cuda":
        kwargs["fused"] = True
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), **kwargs)
    return torch.optim.Adam(model.parameters(), **kwargs)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of ``cfg.lr`` at optimizer step ``step`` (0-based): linear warm-up from 1/100 over
    ``warmup_epochs``, then constant or a cosine decay to ``min_lr`` at the last step."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    total = cfg.epochs * steps_per_epoch
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warmup:
            return 0.01 + 0.99 * step / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup - 1)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def augment_strength(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    """The augmentation's strength at optimizer step ``step`` (0-based): 1 until the last ``train.augment.anneal``
    of the run's steps, then falling linearly to 0 at its last step (``pipeline.augment``: 0 is no augmentation)."""
    total = cfg.epochs * steps_per_epoch
    fade = round(cfg.augment.anneal * total)

    def strength(step: int) -> float:
        left = total - 1 - step  # steps after this one
        return 1.0 if left >= fade else max(0.0, left / fade)

    return strength


def epochs_within(time_limit_s: float, max_epochs: int, done: int, elapsed_s: float, epoch_s: float) -> int:
    """How many epochs a run with ``time_limit_s`` trains: the ``done`` ones, plus as many more at ``epoch_s`` each
    (with PACE_MARGIN) as fit in what is left of the limit after ``elapsed_s``; at most ``max_epochs``."""
    more = math.floor(max(0.0, time_limit_s - elapsed_s) / (max(epoch_s, 1e-9) * PACE_MARGIN))
    return max(done, min(max_epochs, done + more))


class EpochPlan:
    """The epoch count of one run under an optional time limit (seconds from the run's start): ``train.epochs``,
    or after PLAN_AFTER_EPOCHS epochs, fewer if that many would not finish in time at the pace of the last epoch.
    After that, a guard: when the epochs left would end past the limit at the mean pace of the epochs since the
    first (a machine that slowed down), the count is cut again, to what fits at that pace (with PACE_MARGIN);
    it never grows back.
    ``replan`` returns the new TrainConfig (``epochs`` set: the LR schedule then decays to ``min_lr`` at the
    planned end) when the count changed, else None. A plan within the warm-up (``warmup_epochs`` >=
    PLAN_AFTER_EPOCHS) changes no learning rate already used; one after it moves the cosine from its value for
    ``train.epochs`` to the slightly lower one for the planned count (e.g. 0.995 -> 0.993 of lr for 24 -> 20
    epochs after 2 with a 1-epoch warm-up); a later cut moves the rest of the cosine (and of an augmentation
    fade) to end at the new count."""

    def __init__(self, cfg: TrainConfig, time_limit_s: float | None, on_plan: PlanCallback | None, desc: str):
        self.cfg, self.limit, self.on_plan, self.desc = cfg, time_limit_s, on_plan, desc
        self.first_end = 0.0  # seconds from the start to the end of the first epoch (its one-time costs)

    @property
    def epochs(self) -> int:
        return self.cfg.epochs

    def replan(self, done: int, elapsed_s: float, one_off_s: float = 0.0) -> TrainConfig | None:
        """Call at the same point of every epoch (after its evaluation) with the seconds since the run started;
        ``one_off_s``: how many of them, after the first epoch, went to work that does not recur every epoch (the
        caller's own rebuilding of a schedule after an earlier plan). They count against the limit, not in the
        pace: otherwise a plan's own cost would read as a slower machine and cut the count again."""
        if done == 1:
            self.first_end = elapsed_s
        if self.limit is None or done < PLAN_AFTER_EPOCHS or self.cfg.epochs <= done:
            return None
        pace = (elapsed_s - one_off_s - self.first_end) / (done - 1)  # s per epoch after the first
        if done == PLAN_AFTER_EPOCHS:
            n = epochs_within(self.limit, self.cfg.epochs, done, elapsed_s, pace)
            why = (f"{self.desc}: {n} of {self.cfg.epochs} epochs fit the time limit of {self.limit:.0f} s "
                   f"({pace:.2f} s per epoch, {elapsed_s:.1f} s for the first {done})")
        else:
            if elapsed_s + (self.cfg.epochs - done) * pace <= self.limit:
                return None
            n = epochs_within(self.limit, self.cfg.epochs, done, elapsed_s, pace)  # fewer: those left did not fit
            why = (f"{self.desc}: the pace slowed to {pace:.2f} s per epoch ({elapsed_s:.1f} s for the first {done}); "
                   f"{n} instead of {self.cfg.epochs} epochs fit the time limit of {self.limit:.0f} s")
        if self.on_plan is not None:
            self.on_plan(n, why)
        if n == self.cfg.epochs:
            return None
        self.cfg = self.cfg.model_copy(update={"epochs": n})
        return self.cfg


_COMPILED: dict[tuple[str, str, str], Callable] = {}


def compiled_forward(model: nn.Module, key: str, mode: str) -> Callable[[Tensor], Tensor]:
    """``model``'s forward under torch.compile. Compiled code is kept per (architecture, mode, device) for the
    process, so the folds of one configuration compile once: parameters are graph inputs, not constants."""
    device = str(next(model.parameters()).device)
    step = _COMPILED.get((key, mode, device))
    if step is None:
        step = _COMPILED[(key, mode, device)] = torch.compile(
            lambda module, x: module(x), mode=None if mode == "default" else mode, dynamic=False)
    return lambda x: step(model, x)


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
    time_limit_s: float | None = None,
    on_plan: PlanCallback | None = None,
) -> FitResult:
    """Train a fresh model; after every epoch report train_loss/train_error (means over the epoch's batches)
    and <name>_loss/<name>_error for each evaluation set, to ``callback`` and into the returned history.

    Deterministic on CPU for a given ``seed`` (weights and batch order both derive from it). ``should_stop`` is
    polled before every batch; when it returns True, TrainingAborted is raised. On CUDA with
    ``train.cuda_graph=auto`` (and no compile or dropout) the steps run as a replayed CUDA graph
    (``pipeline.batched.train_stacked``).

    ``train.ema_decay``: the result's model and the evaluation sets' ``<name>_loss/_error`` are those of the
    weights' exponential moving average (``torch.optim.swa_utils.AveragedModel``, updated after every optimizer
    step with ``ema_weight``'s warm-up); ``<name>_loss_raw/_error_raw`` are the trained weights' own.

    ``time_limit_s``: train at most ``train.epochs``, fewer when they would not finish within this many seconds of
    the start (``EpochPlan``); ``on_plan(epochs, why)`` hears the count when it is set, and again if a slower pace
    later cuts it.
    """
    seed = train_cfg.seed if seed is None else seed
    device = resolve_device(train_cfg.device)
    from pipeline.batched import graph_wanted, train_stacked

    if graph_wanted(train_cfg, model_cfg, device):
        # On CUDA, a small model's step is bound by kernel launches: the stacked trainer with one model captures
        # the whole step as one CUDA graph (the same arithmetic; the last batch padded with zero-weight samples).
        return train_stacked(model_cfg, train_cfg, train_images, train_labels, [None], [seed], [eval_sets or {}],
                             callback=None if callback is None else lambda _, epoch, m: callback(epoch, m),
                             should_stop=should_stop, progress=progress, desc=desc, time_limit_s=time_limit_s,
                             on_plan=on_plan)[0]
    model = build_model(model_cfg, seed=seed).to(device)
    optimizer = _optimizer(model, train_cfg, device)
    ema = AveragedModel(model, multi_avg_fn=_ema_update(train_cfg.ema_decay)) if train_cfg.ema_decay else None
    delivered = model if ema is None else ema.module  # what is evaluated under the sets' names, and returned
    images, labels = train_images.to(device), train_labels.to(device)
    evals = {name: (x.to(device), y.to(device)) for name, (x, y) in (eval_sets or {}).items()}
    shuffler = torch.Generator().manual_seed(seed)
    augmenter = torch.Generator(device=device).manual_seed(seed + 1) if train_cfg.augment.active else None
    n, bs = len(labels), train_cfg.batch_size
    steps = math.ceil(n / bs)
    fading = augment_strength(train_cfg, steps) if augmenter is not None and train_cfg.augment.anneal else None
    scheduler = None
    if train_cfg.schedule != "constant" or train_cfg.warmup_epochs:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(train_cfg, steps))
    bf16 = train_cfg.precision == "bf16" and device.type == "cuda"
    forward = model if train_cfg.compile == "off" else compiled_forward(
        model, model_cfg.model_dump_json(), train_cfg.compile)
    result = FitResult(model=model, device=str(device))
    plan = EpochPlan(train_cfg, time_limit_s, on_plan, desc)
    bar = tqdm(total=train_cfg.epochs * steps, desc=desc, unit="batch", leave=False,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        epoch = 0
        while epoch < plan.epochs:
            epoch += 1
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
                if augmenter is not None:
                    strength = 1.0 if fading is None else fading((epoch - 1) * steps + i // bs)
                    x = augment(x, train_cfg.augment, augmenter, strength)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                    logits = forward(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=train_cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if train_cfg.grad_clip:
                    nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                if scheduler is not None:
                    scheduler.step()
                loss_sum += loss.detach() * len(idx)
                wrong += (logits.detach().argmax(1) != y).sum()
                bar.update(1)
            metrics = {"train_loss": loss_sum.item() / n, "train_error": wrong.item() / n,
                       "lr": optimizer.param_groups[0]["lr"]}
            if fading is not None:  # the augmentation's strength in the epoch's last step
                metrics["augment_strength"] = fading(epoch * steps - 1)
            if not math.isfinite(metrics["train_loss"]):
                raise TrainingDiverged(f"{desc}: training loss is {metrics['train_loss']} in epoch {epoch} "
                                       f"(train.lr={train_cfg.lr}); lower the learning rate")
            for name, (x, y) in evals.items():
                metrics[f"{name}_loss"], metrics[f"{name}_error"] = evaluate(delivered, x, y,
                                                                             train_cfg.eval_batch_size, device)
                if ema is not None:
                    metrics[f"{name}_loss_raw"], metrics[f"{name}_error_raw"] = evaluate(
                        model, x, y, train_cfg.eval_batch_size, device)
            metrics["epoch_seconds"] = time.perf_counter() - epoch_start
            planned = plan.replan(epoch, time.perf_counter() - start)
            if planned is not None:
                if fading is not None:
                    fading = augment_strength(planned, steps)
                if scheduler is not None:  # the next step's learning rate, too, from the new schedule
                    scheduler.lr_lambdas = [lr_factor(planned, steps)]
                    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
                        group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
                    metrics["lr"] = optimizer.param_groups[0]["lr"]
                bar.total = planned.epochs * steps
                bar.refresh()
            result.history.append(metrics)
            bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items() if k.endswith("error")})
            if callback is not None:
                callback(epoch, metrics)
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start
    result.model = delivered
    delivered.eval()
    return result
