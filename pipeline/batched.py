"""The k cross-validation folds of one configuration trained together, as one stacked model.

Each fold's ViT is built as ``pipeline.train.fit`` builds it (``build_model(cfg, seed=seeds[i])``); their parameters
are laid side by side in one ``(k, P)`` tensor, and one training step advances all k: the folds' batches are stacked
into ``(k, batch, 1, 28, 28)`` and ``stacked_forward`` runs the k ViTs with batched weights: each linear layer is one
batched matrix product over the fold axis, attention one ``scaled_dot_product_attention`` call over k x batch
sequences. A step of k folds thus launches the kernels of one fold's step, each k times larger. On a GPU, where the
seed model's steps are bound by kernel launches, that makes k small steps one step. On CPU, where the work is
arithmetic, it is about as fast as sequential folds (figures in bench/README.md).

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
- validation of all k folds in one stacked forward pass per chunk of ``eval_batch_size`` images (each fold's set
  padded to the longest, the padding masked out): the loss and error fit's ``evaluate`` reports, to float rounding.
  Each fold's ViT in the result holds its row of the stacked weights;
- ``train.ema_decay``: the weights' moving average is one more ``(k, P)`` tensor, lerped towards the weights in the
  step (its per-fold weights in the step table: a fold sitting out leaves its average too); it is what is evaluated
  and returned, as fit's ``AveragedModel``, and the trained weights' figures come as ``<name>_loss_raw/_error_raw``;
- ``train.augment.anneal``: each fold's augmentation strength at its own step (``pipeline.train.augment_strength``),
  a host number in the eager path as in fit, a column of the step table in the captured one.

``train.compile`` is not applied here. On CUDA (``train.cuda_graph=auto``, no dropout) the whole step is captured
once as a CUDA graph and replayed for every step: augmentation, forward, backward and the Adam update.
- The step reads its batch indices, masks and Adam constants from device tensors, through a step counter on the
  device, so one capture serves the whole run.
- The augmentation generators are registered with the graph, so each replay draws anew.
- The GPU then sees one launch per step instead of hundreds of kernel launches from Python. Those launches bound
  the small models here, and most likely the 1M-parameter strong one at batch 512 too.
- ``fit`` takes this path on CUDA as well, with k = 1.
- Each run has its own CUDA stream, so concurrent fold tasks overlap on the GPU.

Dropout draws differ from ``fit``'s (fit's dropout is not seeded either).
"""

from __future__ import annotations

import copy
import math
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils import parameters_to_vector
from tqdm.auto import tqdm

from pipeline.augment import augment
from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import ViT, build_model, patchify
from pipeline.train import (EpochPlan, FitResult, PlanCallback, TrainingAborted, TrainingDiverged, augment_strength,
                            ema_weight, lr_factor, resolve_device, to_pixels)

FoldCallback = Callable[[int, int, dict[str, float]], None]
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults, which fit uses


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
    ema_w: Tensor          # train.ema_decay: ema.lerp_(weights, ema_w): pipeline.train.ema_weight after the fold's
                           # earlier steps (1 at its first: a copy), or 0 when sitting out
    aug: Tensor            # train.augment.anneal: the augmentation's strength at the fold's step (1: as configured)

    def row(self, step: Tensor) -> _StepTable:
        """The constants of the step that the device counter ``step`` (shape (1,)) names, each (k, 1): read on the
        device, so a captured CUDA graph reads the right row at every replay."""
        return _StepTable(**{name: getattr(self, name).index_select(0, step).squeeze(0)
                             for name in _StepTable.__dataclass_fields__})


def _step_table(cfg: TrainConfig, steps: list[int], device: torch.device) -> _StepTable:
    """The run's step table. Each fold's constants are computed once per optimizer step it takes, in Python floats
    as before, then laid out over the run's rows by index: a 200-epoch, 118-step plan takes ~0.03 s, not the ~0.5 s
    of a loop over every (row, fold, constant), which a replan paid inside an epoch and then read as a slower pace."""
    per_epoch, epochs = max(steps), cfg.epochs
    step = np.arange(per_epoch)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in _StepTable.__dataclass_fields__}
    for fold_steps in steps:
        factor, fading = lr_factor(cfg, fold_steps), augment_strength(cfg, fold_steps)
        taken = []  # per optimizer step `done` of the fold: its constants when it trains
        for done in range(epochs * fold_steps):
            lr = cfg.lr * factor(done)  # what LambdaLR sets for step `done`
            t = done + 1  # Adam's step count after this step
            taken.append((-lr / (1 - BETA1**t), (1 - BETA2**t) ** 0.5,
                          1 - lr * cfg.weight_decay if cfg.optimizer == "adamw" else 1.0,
                          ema_weight(cfg.ema_decay, done) if cfg.ema_decay else 0.0, fading(done)))
        values = np.array(taken, dtype=np.float64).reshape(epochs * fold_steps, 5)
        # row (epoch, step): the fold's optimizer steps before it; a fold past its own steps sits the step out
        done = (np.arange(epochs)[:, None] * fold_steps + np.minimum(step, fold_steps - 1)[None, :]).ravel()
        active = np.tile(step < fold_steps, epochs)
        neg_step_size, bias2_sqrt, decay, ema_w, aug = values[done].T
        columns["neg_step_size"].append(np.where(active, neg_step_size, 0.0))
        columns["bias2_sqrt"].append(bias2_sqrt)
        columns["decay"].append(np.where(active, decay, 1.0))
        columns["w1"].append(np.where(active, 1 - BETA1, 0.0))
        columns["b2"].append(np.where(active, BETA2, 1.0))
        columns["w2"].append(np.where(active, 1 - BETA2, 0.0))
        columns["ema_w"].append(np.where(active, ema_w, 0.0))
        columns["aug"].append(aug)
    return _StepTable(**{name: torch.tensor(np.stack(cols, axis=1), dtype=torch.float32, device=device).unsqueeze(-1)
                         for name, cols in columns.items()})


SPLIT_K_CHUNKS, SPLIT_K_ROWS = (32, 16, 8, 4, 2), 64  # chunk counts tried in turn; rows per chunk at least


def _split_k(rows: int) -> int:
    """How many chunks ``_StackedLinear`` cuts a weight gradient's reduction over ``rows`` rows into (1: none): the
    first of SPLIT_K_CHUNKS that divides them into chunks of at least SPLIT_K_ROWS rows."""
    return next((c for c in SPLIT_K_CHUNKS if rows % c == 0 and rows // c >= SPLIT_K_ROWS), 1)


def _product(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (k, n, in) through weight (k, out, in) and bias (k, out): one batched matrix product -> (k, n, out)."""
    return (torch.baddbmm(bias.unsqueeze(1), rows, weight.transpose(1, 2)) if bias is not None
            else torch.bmm(rows, weight.transpose(1, 2)))


class _StackedLinear(torch.autograd.Function):
    """k linear layers whose weight gradient is a split-K batched product. Autograd's own backward of ``baddbmm``
    computes each fold's (out, in) weight gradient as one product reducing over all B * T rows: cuBLAS splits that
    reduction across thread blocks for one matrix (k = 1) but not for a batch of them, so with k > 1 a small model's
    weight gradient ran on k thread blocks, each looping over the 6,400 rows of a batch (on an H200, 2026-12-04:
    154 us per product, 55% of the GPU time of 3 stacked seed-model folds). Here the rows are cut into chunks, one
    product per (fold, chunk), then summed over the chunks: the same sum in another order."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor, bias: Tensor | None, chunks: int) -> Tensor:
        ctx.save_for_backward(rows, weight)
        ctx.chunks, ctx.has_bias = chunks, bias is not None
        return _product(rows, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        rows, weight = ctx.saved_tensors
        (k, n, d_in), d_out, c = rows.shape, weight.shape[1], ctx.chunks
        grad_rows = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            parts = torch.bmm(grad.reshape(k * c, n // c, d_out).transpose(1, 2), rows.reshape(k * c, n // c, d_in))
            grad_weight = parts.view(k, c, d_out, d_in).sum(1)
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias, None


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, split_k: bool | None = None) -> Tensor:
    """k linear layers at once: x (k, ..., in), weight (k, out, in), bias (k, out) -> (k, ..., out); one batched
    matrix product over the fold axis, each fold's rows through its own weights.

    ``split_k`` (None: while a CUDA graph is being captured, in float32, i.e. not under autocast): train through
    ``_StackedLinear``, whose weight gradient reduces over the rows in chunks. Under bf16 autocast the plain product
    stays: the chunks' partial sums would each be rounded to bf16, and the strong preset's wider layers fill the GPU
    without splitting. Eager CUDA steps (dropout, torch.compile) take the plain product as well: they wait on the
    host's kernel launches, not on the GPU, and on the H200 the split's extra kernels made 3 eager batched folds
    slower (1.37x -> 1.67x one fold), while the captured ones went from 2.94x to 1.49-1.52x."""
    k = x.shape[0]
    rows = x.reshape(k, -1, x.shape[-1])
    if split_k is None:
        split_k = (rows.is_cuda and torch.cuda.is_current_stream_capturing()
                   and not torch.is_autocast_enabled(rows.device.type))
    chunks = _split_k(rows.shape[1]) if split_k and torch.is_grad_enabled() else 1
    if chunks > 1:
        out = _StackedLinear.apply(rows, weight, bias, chunks)
    else:
        out = _product(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[1])


# On CUDA, LayerNorms over at most this many features run as _ShortRowNorm (0: never). 32 takes in the seed model
# (8), whose profile showed the per-row kernel, and the cpu preset's width; the strong preset (128) keeps the kernel
# its GPU runs were measured with.
SHORT_ROW_NORM_DIM = 32


class _ShortRowNorm(torch.autograd.Function):
    """LayerNorm without affine over the last axis, (x - mean) / sqrt(var + eps), as a few whole-tensor kernels.

    CUDA's ``F.layer_norm`` gives every row its own thread block of 128 threads, forward and backward alike, however
    short the row: the seed model's rows are 8 features long, and 3 stacked folds' batch has 19,200 of them. On an
    H200 (2026-12-04) its forward took 35 us a call there against 14 us for one fold's 6,400 rows, the largest
    kernel to grow with the number of folds after the weight gradients. Here one ``var_mean`` reduction and a few
    elementwise kernels do the forward, and the backward is written out as
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)): each kernel spreads the rows over the whole GPU.
    Float32 throughout, as autocast runs ``layer_norm``."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        var, mean = torch.var_mean(x, dim=-1, keepdim=True, correction=0)
        rstd = var.add_(eps).rsqrt_()
        normalized = (x - mean).mul_(rstd)
        ctx.save_for_backward(normalized, rstd)
        return normalized

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        normalized, rstd = ctx.saved_tensors
        mean_grad = grad.mean(-1, keepdim=True)
        mean_projection = (grad * normalized).mean(-1, keepdim=True)
        return (grad - torch.addcmul(mean_grad, normalized, mean_projection)).mul_(rstd), None


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float, short_rows: bool | None = None) -> Tensor:
    """k LayerNorms over the last axis: x (k, ..., d), weight and bias (k, d).

    ``short_rows`` (None: on CUDA for d <= SHORT_ROW_NORM_DIM) normalizes through ``_ShortRowNorm`` instead of
    ``F.layer_norm``: the same arithmetic, to float rounding, in kernels that do not give each row a thread block."""
    if short_rows is None:
        short_rows = x.is_cuda and x.shape[-1] <= SHORT_ROW_NORM_DIM
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    normalized = _ShortRowNorm.apply(x, eps) if short_rows else F.layer_norm(x, x.shape[-1:], eps=eps)
    return torch.addcmul(bias.view(shape), normalized, weight.view(shape))


def _conv_stem(stem: torch.nn.Sequential, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """k conv stems at once: x (k, B, C, H, W) -> tokens (k, B, h * w, dim). The models' channels lie side by side,
    (B, k * C, H, W), and each convolution is one grouped convolution (groups=k): model i's channels through model
    i's kernels only. GELU and max-pooling act on each channel alone, so they run as they are."""
    k, b = x.shape[:2]
    x = x.transpose(0, 1).reshape(b, -1, *x.shape[-2:])
    for i, layer in enumerate(stem):
        if isinstance(layer, torch.nn.Conv2d):
            x = F.conv2d(x, params[f"stem.{i}.weight"].flatten(0, 1), params[f"stem.{i}.bias"].flatten(),
                         stride=layer.stride, padding=layer.padding, groups=k)
        else:
            x = layer(x)
    return x.view(b, k, -1, x.shape[-2] * x.shape[-1]).permute(1, 0, 3, 2)  # grid row-major, as ViT.tokens


def stacked_forward(template: ViT, params: dict[str, Tensor], pixels: Tensor, *,
                    explicit_attention: bool = False) -> Tensor:
    """``ViT.forward`` of k models at once, with batched weights: ``params`` maps each of ``template``'s parameter
    names to the k models' values stacked on dim 0, ``pixels`` (k, B, C, H, W) -> logits (k, B, classes).

    Every linear layer is one batched matrix product over the k models and attention is one
    ``scaled_dot_product_attention`` call over k * B sequences, so a step of k models launches the kernels of one
    model's step; on CUDA a LayerNorm over at most ``SHORT_ROW_NORM_DIM`` features runs as ``_ShortRowNorm``.
    ``template`` supplies the structure, buffers and parameter-free modules (GELU, dropout); its own weights are not
    read. tests/test_batched.py checks this against ``ViT.forward`` for each model's weights.

    ``explicit_attention`` writes attention out as softmax(QK^T / sqrt(d_head)) V, the arithmetic of SDPA's math
    path, for when the fused kernel fails (``train_stacked`` falls back to it; an earlier ``vmap`` version of this
    forward hit "LSE is not correctly aligned" in CUDA's memory-efficient backward)."""
    cfg = template.cfg
    k, b = pixels.shape[:2]

    def linear(x: Tensor, name: str) -> Tensor:
        return _linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))

    def norm(x: Tensor, name: str, module: torch.nn.LayerNorm) -> Tensor:
        return _layer_norm(x, params[f"{name}.weight"], params[f"{name}.bias"], module.eps)

    x = (pixels.flatten(0, 1) - template.pixel_mean) / template.pixel_std
    if cfg.stem != "patch":
        x = _conv_stem(template.stem, params, x.view(k, b, *x.shape[1:]))
    else:
        x = linear(patchify(x, cfg.patch_size).view(k, b, template.num_patches, -1), "patch_embed")
    if cfg.pool == "cls":
        x = torch.cat([params["cls_token"].view(k, 1, 1, cfg.dim).expand(k, b, 1, cfg.dim), x], dim=2)
    pos = params["pos_embed"] if "pos_embed" in params else template.pos_embed  # learned (k, 1, T, d) or fixed
    x = template.dropout(x + pos)
    tokens, heads = x.shape[2], cfg.heads
    for i, block in enumerate(template.blocks):
        name = f"blocks.{i}"
        qkv = linear(norm(x, f"{name}.norm1", block.norm1), f"{name}.attn.qkv")
        q, key, v = qkv.view(k * b, tokens, 3, heads, cfg.dim // heads).permute(2, 0, 3, 1, 4).unbind(0)
        p = block.attn.dropout if template.training else 0.0
        if explicit_attention:
            scores = torch.softmax(q @ key.transpose(-2, -1) * (q.shape[-1] ** -0.5), dim=-1)
            attended = F.dropout(scores, p) @ v
        else:
            attended = F.scaled_dot_product_attention(q, key, v, dropout_p=p)  # (k * B, heads, T, d_head)
        attended = attended.transpose(1, 2).reshape(k, b, tokens, cfg.dim)
        if cfg.attn_out_proj:
            attended = linear(attended, f"{name}.attn.proj")
        x = x + attended
        hidden = block.mlp[2](block.mlp[1](linear(norm(x, f"{name}.norm2", block.norm2), f"{name}.mlp.0")))
        x = x + block.mlp[4](linear(hidden, f"{name}.mlp.3"))
    if cfg.pool == "cls":
        return linear(norm(x[:, :, 0], "norm", template.norm), "head")
    return linear(norm(x, "norm", template.norm).mean(dim=2), "head")


def _stack_eval_sets(eval_sets: Sequence[dict[str, tuple[Tensor, Tensor]]], device: torch.device
                     ) -> dict[str, tuple[Tensor, Tensor, Tensor, list[int]]]:
    """The k models' evaluation sets of each name side by side, padded to the longest: name -> (images (k, n, ...),
    labels (k, n), real (k, n), sizes). Every model has sets of the same names (``train_stacked`` checks)."""
    stacked = {}
    for name in eval_sets[0]:
        sizes = [len(sets[name][1]) for sets in eval_sets]
        first = eval_sets[0][name][0]
        images = torch.zeros((len(eval_sets), max(sizes), *first.shape[1:]), dtype=first.dtype, device=device)
        labels = torch.zeros((len(eval_sets), max(sizes)), dtype=torch.long, device=device)
        for f, sets in enumerate(eval_sets):
            x, y = sets[name]
            images[f, :len(y)], labels[f, :len(y)] = x.to(device), y.to(device)
        real = torch.arange(max(sizes), device=device) < torch.tensor(sizes, device=device).unsqueeze(1)
        stacked[name] = (images, labels, real, sizes)
    return stacked


@torch.inference_mode()
def _evaluate_stacked(template: ViT, params: dict[str, Tensor], images: Tensor, labels: Tensor, real: Tensor,
                      sizes: list[int], batch_size: int) -> tuple[list[float], list[float]]:
    """(mean cross-entropy, misclassification error) of each of the k models on its own padded set, as
    ``pipeline.train.evaluate`` computes them (eval mode, float32, no label smoothing), in one stacked forward
    pass per chunk of ``batch_size`` images in all (``batch_size // k`` per model), with one sync at the end."""
    k, n = labels.shape
    chunk = max(1, batch_size // k)
    loss_sum = torch.zeros(k, device=labels.device)
    wrong = torch.zeros(k, dtype=torch.long, device=labels.device)
    was_training = template.training
    template.eval()
    try:
        for i in range(0, n, chunk):
            logits = stacked_forward(template, params, to_pixels(images[:, i:i + chunk])).float()
            y, mask = labels[:, i:i + chunk], real[:, i:i + chunk]
            per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(k, -1)
            loss_sum += per_sample.masked_fill(~mask, 0.0).sum(1)
            wrong += ((logits.argmax(-1) != y) & mask).sum(1)
    finally:
        template.train(was_training)
    losses, errors = loss_sum.tolist(), wrong.tolist()
    return ([total / size if size else float("nan") for total, size in zip(losses, sizes)],
            [count / size if size else float("nan") for count, size in zip(errors, sizes)])


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
    if len(folds) == 0 or len(seeds) != len(folds):
        raise ValueError(f"fit_folds needs one seed per fold; got {len(folds)} folds and {len(seeds)} seeds")
    vals = [{"val": (images[va], labels[va])} for va in (torch.as_tensor(va, dtype=torch.long) for _, va in folds)]
    return train_stacked(model_cfg, train_cfg, images, labels, [tr for tr, _ in folds], seeds, vals,
                         callback=callback, should_stop=should_stop, progress=progress, desc=desc)


def graph_wanted(train_cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device) -> bool:
    """``train.cuda_graph=auto`` on CUDA: replay each training step as one captured CUDA graph, unless the
    step has dropout or torch.compile (which brings its own graphs: ``train.compile=reduce-overhead``).
    Augmentation is captured too: its per-fold generators are registered with the graph."""
    return (train_cfg.cuda_graph == "auto" and device.type == "cuda" and train_cfg.compile == "off"
            and model_cfg.dropout == 0)


_CAPTURE_LOCK = threading.Lock()  # one capture at a time in the process (fold tasks run in threads)
WARMUP_STEPS = 3  # eager steps before a capture, as the CUDA graph docs ask (lazy initialisation off the graph)


class _StepRunner:
    """Runs one training step: eagerly, or captured once as a CUDA graph and replayed.

    Capture follows PyTorch's whole-network recipe: a few eager warm-up steps on the (side) stream the run uses,
    then one capture; the warm-up's effect on ``state`` (weights, Adam moments, counters) is undone, so the run
    is the same sequence of steps as the eager one. ``warm_up`` without ``capture`` does the warm-up and the
    restore only: on CUDA, a probe of the step before training starts; on the CPU, what the tests can check of the
    captured path without a GPU. A warm-up step that fails raises (with the state restored); a failed capture falls
    back to eager steps with a warning naming the error and ``train.cuda_graph=off``."""

    def __init__(self, step: Callable[[int], None], state: Sequence[Tensor], generators: Sequence[torch.Generator],
                 device: torch.device, warm_up: bool, capture: bool, desc: str) -> None:
        self.step, self.graph, self.desc = step, None, desc
        self._watch: tuple[Sequence[torch.Generator], list[int]] | None = None
        if not warm_up:
            return
        saved = [t.clone() for t in state]
        saved_rng = [g.get_state() for g in generators]
        try:  # an error here is the step's own, captured or not: it propagates (train_stacked may retry)
            for _ in range(WARMUP_STEPS):
                step(0)
        finally:  # a capture runs nothing, so after this the state is where the run starts, whatever happens
            self._restore(state, saved, generators, saved_rng)
        if not capture:
            return
        try:
            graph = torch.cuda.CUDAGraph()
            for generator in generators:  # the augmentation's own generators: each replay draws anew
                graph.register_generator_state(generator)
            with _CAPTURE_LOCK, torch.cuda.graph(graph, stream=torch.cuda.current_stream(),
                                                 capture_error_mode="thread_local"):
                step(0)
            self.graph = graph
            offsets = _offsets(generators)
            self._watch = (generators, offsets) if offsets else None
        except Exception as exc:  # noqa: BLE001 - any capture failure: train eagerly instead
            warnings.warn(f"{desc}: CUDA graph capture failed ({type(exc).__name__}: {exc}); training eagerly "
                          f"(train.cuda_graph=off skips the attempt)", RuntimeWarning, stacklevel=3)

    @staticmethod
    @torch.no_grad()
    def _restore(state: Sequence[Tensor], saved: Sequence[Tensor], generators: Sequence[torch.Generator],
                 saved_rng: Sequence[Tensor]) -> None:
        """Undo the warm-up: tensors and the augmentation generators back to where the run starts."""
        for t, value in zip(state, saved):
            t.copy_(value)
        for generator, rng in zip(generators, saved_rng):
            generator.set_state(rng)

    def __call__(self, s: int) -> None:
        if self.graph is None:
            self.step(s)
            return
        self.graph.replay()
        if self._watch is not None:  # after the first replay: did the augmentation generators move on?
            generators, before = self._watch
            self._watch = None
            if any(a == b for a, b in zip(_offsets(generators), before)):
                warnings.warn(f"{self.desc}: the captured step's augmentation generators did not advance on "
                              f"replay, so every step would draw the same augmentation; training the rest "
                              f"eagerly (train.cuda_graph=off skips the capture)", RuntimeWarning, stacklevel=2)
                self.graph = None


def _offsets(generators: Sequence[torch.Generator]) -> list[int]:
    """The Philox offsets of CUDA generators (empty where a generator has none, e.g. on the CPU)."""
    try:
        return [g.get_offset() for g in generators]
    except RuntimeError:
        return []


def train_stacked(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    images: Tensor,
    labels: Tensor,
    train_indices: Sequence[Tensor | None],
    seeds: Sequence[int],
    eval_sets: Sequence[dict[str, tuple[Tensor, Tensor]]],
    *,
    callback: FoldCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    progress: bool | None = None,
    desc: str = "folds",
    graph: bool | None = None,
    time_limit_s: float | None = None,
    on_plan: PlanCallback | None = None,
) -> list[FitResult]:
    """k models of one configuration trained as one stacked model: model ``i`` from the weights of ``seeds[i]`` on
    ``images[train_indices[i]]`` (None: all of them), evaluated on its own ``eval_sets[i]`` (name -> (images,
    labels); the same names for every model) after every epoch; history keys as ``pipeline.train.fit`` reports them.
    ``fit_folds`` is this with one validation set per fold; ``fit`` on CUDA is this with k = 1 when the step can be
    a CUDA graph.

    ``graph``: capture the training step as a CUDA graph (None: ``graph_wanted``). The step then reads every
    per-step value (batch indices, masks, Adam's constants) from device tensors through a step counter on the
    device, so one capture serves every step of the run; on the CPU, True rehearses that path without a capture.
    ``time_limit_s``/``on_plan``: as for ``fit`` (``pipeline.train.EpochPlan``); a new count rewrites the optimizer's
    step table in place, so a captured graph reads the new schedule.
    """
    k = len(train_indices)
    if k == 0 or len(seeds) != k or len(eval_sets) != k:
        raise ValueError(f"train_stacked needs one seed and one evaluation dict per model; got {k} index sets, "
                         f"{len(seeds)} seeds and {len(eval_sets)} evaluation dicts")
    if any(list(sets) != list(eval_sets[0]) for sets in eval_sets):
        raise ValueError(f"train_stacked evaluates all models together: every evaluation dict needs the same names; "
                         f"got {[list(sets) for sets in eval_sets]}")
    device = resolve_device(train_cfg.device)
    graph = graph_wanted(train_cfg, model_cfg, device) if graph is None else graph
    train_idx = [torch.arange(len(labels)) if idx is None else torch.as_tensor(idx, dtype=torch.long)
                 for idx in train_indices]
    sizes = [len(idx) for idx in train_idx]
    if min(sizes) == 0:
        raise ValueError(f"{desc}: fold {sizes.index(0) + 1} has no training images")
    # On CUDA the run gets its own stream: concurrent fold tasks (threads) then overlap on the GPU instead of
    # queueing on the one default stream, and a capture needs a stream other than the default one anyway.
    stream = torch.cuda.Stream(device) if graph and device.type == "cuda" else None
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        models, histories, total = _train_stacked(model_cfg, train_cfg, images, labels, train_idx, sizes, seeds,
                                                  eval_sets, device, graph, callback, should_stop, progress, desc,
                                                  EpochPlan(train_cfg, time_limit_s, on_plan, desc))
    if stream is not None:
        stream.synchronize()
    for model in models:  # own storage (on the caller's stream), detached from the stacked tensor
        for p in model.parameters():
            p.data = p.data.clone()
        model.eval()
    return [FitResult(model=model, history=history, seconds=total, device=str(device))
            for model, history in zip(models, histories)]


def _train_stacked(model_cfg: ModelConfig, train_cfg: TrainConfig, images: Tensor, labels: Tensor,
                   train_idx: list[Tensor], sizes: list[int], seeds: Sequence[int],
                   eval_sets: Sequence[dict[str, tuple[Tensor, Tensor]]], device: torch.device, graph: bool,
                   callback: FoldCallback | None, should_stop: Callable[[], bool] | None, progress: bool | None,
                   desc: str, plan: EpochPlan) -> tuple[list[ViT], list[list[dict[str, float]]], float]:
    k, bs = len(train_idx), train_cfg.batch_size
    steps = [math.ceil(n / bs) for n in sizes]
    per_epoch = max(steps)

    models = [build_model(model_cfg, seed=seed).to(device) for seed in seeds]
    template = copy.deepcopy(models[0])  # structure and buffers for the stacked forward; its own weights unused
    names = [name for name, _ in template.named_parameters()]
    shapes = [p.shape for p in template.parameters()]
    numels = [p.numel() for p in template.parameters()]
    weights = torch.stack([parameters_to_vector(m.parameters()) for m in models]).detach().requires_grad_()  # (k, P)

    def hold(stacked: Tensor) -> None:
        """Each fold's ViT reads its row of ``stacked`` (k, P) as its parameters."""
        for model, row in zip(models, stacked):
            for p, piece, shape in zip(model.parameters(), row.split(numels), shapes):
                p.data = piece.view(shape)

    hold(weights.detach())
    exp_avg, exp_avg_sq = torch.zeros_like(weights), torch.zeros_like(weights)
    ema = weights.detach().clone() if train_cfg.ema_decay else None  # (k, P): the weights' moving average
    table = _step_table(train_cfg, steps, device)

    def by_name(stacked: Tensor) -> dict[str, Tensor]:
        """(k, P) weights -> parameter name -> the k models' values, (k, *shape) views."""
        return {name: piece.view(k, *shape) for name, piece, shape in zip(names, stacked.split(numels, dim=1), shapes)}

    images, labels = images.to(device), labels.to(device)
    stacked_evals = _stack_eval_sets(eval_sets, device)  # all k models in one stacked pass per chunk
    shufflers = [torch.Generator().manual_seed(seed) for seed in seeds]
    augmenters = ([torch.Generator(device=device).manual_seed(seed + 1) for seed in seeds]
                  if train_cfg.augment.active else None)
    # real samples of each fold in each step of an epoch: bs, then the remainder, then 0 once the fold is done
    counts = [[max(0, min(bs, n - s * bs)) for n in sizes] for s in range(per_epoch)]
    count_table = torch.tensor(counts, dtype=torch.float32, device=device)  # (per_epoch, k)
    real = torch.arange(bs, device=device) < count_table.unsqueeze(-1)  # (per_epoch, k, bs)
    bf16 = train_cfg.precision == "bf16" and device.type == "cuda"
    fade = augmenters is not None and bool(train_cfg.augment.anneal)
    # The step's inputs live in fixed device tensors, and the step index is a device counter the step advances
    # itself: the same step can then be captured once as a CUDA graph and replayed for every step of the run.
    order = torch.zeros(k, per_epoch, bs, dtype=torch.long, device=device)  # this epoch's batches; padding -> 0
    counter = torch.zeros(1, dtype=torch.long, device=device)  # steps taken in the run (epoch-major)
    loss_sum = torch.zeros(k, device=device)
    wrong = torch.zeros(k, device=device, dtype=torch.long)

    def step(s: int) -> None:
        """One step of all k models. ``s`` (the step within the epoch) is read on the host only by eager
        augmentation, which draws for each fold's real samples alone, exactly as fit does. The graph path augments
        whole (padded) batches instead: the same distribution, but a partial last batch draws more numbers, so
        from there on the draws differ from fit's."""
        at = torch.remainder(counter, per_epoch)
        idx = order.index_select(1, at).squeeze(1)  # (k, bs)
        x, y = to_pixels(images[idx]), labels[idx]
        mask, n_real = real.index_select(0, at).squeeze(0), count_table.index_select(0, at).squeeze(0)
        row = table.row(counter)  # this step's constants, each (k, 1): the augmentation's strength, Adam's
        if augmenters is not None and graph:  # fixed shapes: every row, padding too (its loss weight is 0)
            strength = row.aug if fade else [1.0] * k
            x = torch.stack([augment(x[f], train_cfg.augment, augmenters[f], strength[f]) for f in range(k)])
        elif augmenters is not None:  # exactly fit's draws: the fold's real samples of this step only
            for f in range(k):
                if counts[s][f]:
                    strength = augment_strength(plan.cfg, steps[f])((epoch - 1) * steps[f] + s) if fade else 1.0
                    x[f, :counts[s][f]] = augment(x[f, :counts[s][f]], train_cfg.augment, augmenters[f], strength)
        params = by_name(weights)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graph):
            logits = stacked_forward(template, params, x, explicit_attention=explicit).float()
            per_sample = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none",
                                         label_smoothing=train_cfg.label_smoothing).view(k, -1)
        loss = per_sample.masked_fill(~mask, 0.0).sum(1) / n_real.clamp(min=1)  # each fold's mean loss
        weights.grad = None
        loss.sum().backward()
        _adam_step(weights, exp_avg, exp_avg_sq, train_cfg, row)
        with torch.no_grad():
            if ema is not None:
                ema.lerp_(weights, row.ema_w)
            loss_sum.add_(loss.detach() * n_real)
            wrong.add_(((logits.detach().argmax(-1) != y) & mask).sum(1))
            counter.add_(1)

    explicit = False  # attention written out instead of the fused kernel: the fallback when a warm-up step fails

    def make_runner() -> _StepRunner:
        """The step runner, after its warm-up steps (on CUDA always; there they also probe the fused kernels).
        If a warm-up step fails, once more with attention written out, the arithmetic of SDPA's math path."""
        nonlocal explicit
        state = [weights, exp_avg, exp_avg_sq, counter, loss_sum, wrong] + ([ema] if ema is not None else [])
        args = (step, state, augmenters or [], device,
                graph or device.type == "cuda", graph and device.type == "cuda", desc)
        try:
            return _StepRunner(*args)
        except torch.OutOfMemoryError:
            raise  # written-out attention needs more memory, not less
        except RuntimeError as exc:
            explicit = True
            warnings.warn(f"{desc}: a training step with PyTorch's fused attention kernel failed "
                          f"({type(exc).__name__}: {str(exc)[:300]}); training with attention written out "
                          f"(softmax(QK^T/sqrt(d))V) instead", RuntimeWarning, stacklevel=2)
            return _StepRunner(*args)

    histories: list[list[dict[str, float]]] = [[] for _ in range(k)]
    runner: _StepRunner | None = None
    bar = tqdm(total=train_cfg.epochs * per_epoch, desc=desc, unit="step", leave=False,
               disable=None if progress is None else not progress, dynamic_ncols=True)
    start = time.perf_counter()
    replanning = 0.0  # seconds spent rebuilding the step table after a plan
    try:
        epoch = 0
        while epoch < plan.epochs:
            epoch += 1
            epoch_start = time.perf_counter()
            epoch_order = torch.zeros(k, per_epoch * bs, dtype=torch.long)
            for f in range(k):
                epoch_order[f, :sizes[f]] = train_idx[f][torch.randperm(sizes[f], generator=shufflers[f])]
            order.copy_(epoch_order.view(k, per_epoch, bs))
            if runner is None:  # after the first epoch's batches are in place: the warm-up steps train on them
                runner = make_runner()
            loss_sum.zero_()
            wrong.zero_()
            for s in range(per_epoch):
                if should_stop is not None and should_stop():
                    raise TrainingAborted(f"{desc}: stopped in epoch {epoch} because the study is stopping")
                runner(s)
                bar.update(1)
            train_loss = [total / n for total, n in zip(loss_sum.tolist(), sizes)]
            train_error = [count / n for count, n in zip(wrong.tolist(), sizes)]
            for f, value in enumerate(train_loss):
                if not math.isfinite(value):
                    which = f" fold {f + 1}/{k}" if k > 1 else ""
                    diverged = TrainingDiverged(f"{desc}{which}: training loss is {value} in epoch {epoch} "
                                                f"(train.lr={train_cfg.lr}); lower the learning rate")
                    diverged.fold = f
                    raise diverged
            trained = by_name(weights.detach())
            current = trained if ema is None else by_name(ema)
            evaluated = {name: _evaluate_stacked(template, current, *stacked, train_cfg.eval_batch_size)
                         for name, stacked in stacked_evals.items()}
            raw = {} if ema is None else {  # the trained weights' own figures, beside their average's
                name: _evaluate_stacked(template, trained, *stacked, train_cfg.eval_batch_size)
                for name, stacked in stacked_evals.items()}
            strengths = [augment_strength(plan.cfg, n)(epoch * n - 1) for n in steps]  # at each fold's last step
            planned = plan.replan(epoch, time.perf_counter() - start, replanning)
            if planned is not None:  # in place: a captured graph keeps reading these tensors
                rebuilt = time.perf_counter()
                new = _step_table(planned, steps, device)
                for name in _StepTable.__dataclass_fields__:
                    fresh = getattr(new, name)
                    getattr(table, name)[:len(fresh)].copy_(fresh)
                replanning += time.perf_counter() - rebuilt  # once per plan: not part of the pace
                bar.total = planned.epochs * per_epoch
                bar.refresh()
            epoch_metrics = []
            for f in range(k):
                metrics = {"train_loss": train_loss[f], "train_error": train_error[f],
                           "lr": train_cfg.lr * lr_factor(plan.cfg, steps[f])(epoch * steps[f])}
                if fade:
                    metrics["augment_strength"] = strengths[f]
                for name, (losses, errors) in evaluated.items():
                    metrics[f"{name}_loss"], metrics[f"{name}_error"] = losses[f], errors[f]
                    if name in raw:
                        metrics[f"{name}_loss_raw"], metrics[f"{name}_error_raw"] = raw[name][0][f], raw[name][1][f]
                epoch_metrics.append(metrics)
            seconds = time.perf_counter() - epoch_start
            for f, metrics in enumerate(epoch_metrics):
                metrics["epoch_seconds"] = seconds
                histories[f].append(metrics)
                if callback is not None:
                    callback(f, epoch, metrics)
            bar.set_postfix({"error": " ".join(f"{v:.4f}" for m in epoch_metrics for key, v in m.items()
                                                if key.endswith("_error") and key != "train_error")})
    finally:
        bar.close()
    if ema is not None:  # the models delivered are the averages
        hold(ema)
    return models, histories, time.perf_counter() - start


@torch.no_grad()
def _adam_step(weights: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, cfg: TrainConfig, row: _StepTable) -> None:
    """One Adam/AdamW step of every fold's row of ``weights`` (k, P), with this step's per-fold constants ``row``
    (each (k, 1)); clipping first (each fold's own global norm), as fit clips before ``optimizer.step()``."""
    grad = weights.grad
    if cfg.grad_clip:
        norm = torch.linalg.vector_norm(grad, dim=1, keepdim=True)
        grad.mul_((cfg.grad_clip / (norm + 1e-6)).clamp_(max=1.0))
    if cfg.weight_decay and cfg.optimizer == "adam":
        grad = grad.add(weights, alpha=cfg.weight_decay)
    if cfg.weight_decay and cfg.optimizer == "adamw":
        weights.mul_(row.decay)
    exp_avg.lerp_(grad, row.w1)
    exp_avg_sq.mul_(row.b2).addcmul_(grad, grad * row.w2)
    denom = exp_avg_sq.sqrt().div_(row.bias2_sqrt).add_(EPS)
    weights.addcmul_(exp_avg / denom, row.neg_step_size)
