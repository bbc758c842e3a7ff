"""Batched folds (pipeline.batched.fit_folds) against sequential fit, fold by fold, on real MNIST subsets (CPU)."""

import pytest
import torch

from pipeline.batched import (BETA1, BETA2, _layer_norm, _linear, _ShortRowNorm, _split_k, _step_table, _StepTable,
                              fit_folds, graph_wanted, stacked_forward, train_stacked)
from pipeline.config import AugmentConfig, ModelConfig, TrainConfig
from pipeline.data import stratified_folds
from pipeline.model import build_model
from pipeline.train import (TrainingAborted, TrainingDiverged, augment_strength, ema_weight, fit, lr_factor,
                            predict_logits, to_pixels)

SEEDS = [1000, 2000, 3000]
MODEL = ModelConfig(depth=2, mlp_hidden=16, pos_base=100)
# assert_same_training's bounds on the weights: all but 1 in OUTLIERS within CLOSE, every one within FAR
CLOSE, FAR, OUTLIERS = 1e-5, 1e-4, 200


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def subset(mnist):
    x, y = mnist.train_images[:2250], mnist.train_labels[:2250]
    return x, y, stratified_folds(y, 3, 0)  # 1500 training / 750 validation images per fold


def sequential(train_cfg, x, y, folds, model=MODEL):
    return [fit(model, train_cfg, x[tr], y[tr], {"val": (x[va], y[va])}, seed=seed, progress=False)
            for (tr, va), seed in zip(folds, SEEDS)]


def assert_same_training(expected, got, x, folds):
    """Same per-epoch metrics, same weights, same outputs, fold by fold.

    The attention's key bias is compared through the outputs only: its gradient is zero in exact arithmetic (a
    constant added to every key of a row leaves the softmax unchanged), and Adam turns the rounding noise there
    into steps of size lr, so two float-equal trainings differ in it without any effect on what the model computes.

    The other weights: all but at most 1 in 200 within 1e-5, and every one within 1e-4 (a fiftieth of one Adam
    step at the default lr). Adam does the same, more weakly, to any weight whose true gradient is near zero: a key
    weight's gradient carries the term (sum of the key gradients over tokens) x (the layer norm's bias), zero in
    exact arithmetic; a hidden unit may hardly ever fire. The batched step rounds differently from fit's (batched
    products, padded last batches), and on one CPU (AMD EPYC, 2026-12-04) one key-weight row drifted to 1.4e-5 in 2
    epochs, and with other augmentation draws one hidden unit's weights to 2.2e-5, while the other folds' weights
    stayed within 2.4e-7, as close as fit is to itself on 1 and 2 threads. A wrong step (its learning rate, its
    batch, a loss scale) moves most weights by far more than 1e-5.
    """
    assert len(expected) == len(got)
    for a, b, (_, val) in zip(expected, got, folds):
        assert [list(m) for m in a.history] == [list(m) for m in b.history]
        for ma, mb in zip(a.history, b.history):
            for key in ma.keys() - {"epoch_seconds"}:
                assert mb[key] == pytest.approx(ma[key], abs=1e-4), key
        gaps = {}
        for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
            if name.endswith("attn.qkv.bias"):
                dim = len(p) // 3
                p, q = torch.cat([p[:dim], p[2 * dim:]]), torch.cat([q[:dim], q[2 * dim:]])
            gaps[name] = (p - q).detach().abs().flatten()
        worst = max(gaps, key=lambda name: gaps[name].max())
        assert gaps[worst].max() <= FAR, (worst, gaps[worst].max().item())
        apart = {name: int((gap > CLOSE).sum()) for name, gap in gaps.items() if (gap > CLOSE).any()}
        assert sum(apart.values()) <= sum(map(len, gaps.values())) // OUTLIERS, apart
        images = x[val]
        assert torch.allclose(predict_logits(a.model, images, 4096, torch.device("cpu")),
                              predict_logits(b.model, images, 4096, torch.device("cpu")), rtol=0, atol=1e-4)


@pytest.mark.parametrize("cfg", [
    MODEL,
    ModelConfig(dim=16, heads=4, depth=3, mlp_hidden=32, attn_out_proj=True, pos_embedding="learned"),
    ModelConfig(dim=12, heads=3, depth=1, mlp_hidden=8, patch_size=7, pos_base=100, input_mean=0.1307,
                input_std=0.3081),
    ModelConfig(dim=16, heads=2, depth=1, mlp_hidden=16, stem="conv", stem_channels=4, pos_embedding="learned"),
    ModelConfig(dim=16, heads=2, depth=1, mlp_hidden=16, stem="conv-pool", stem_channels=4),
    ModelConfig(dim=16, heads=2, depth=2, mlp_hidden=16, pool="mean", pos_embedding="learned"),
    ModelConfig(dim=16, heads=2, depth=2, mlp_hidden=48, stem="conv-pool", stem_channels=4, pool="mean",
                pos_embedding="learned", attn_out_proj=True),
], ids=["seed-like", "out-proj-learned-positions", "patch-7", "conv-stem", "conv-pool-stem", "mean-pool",
        "strong-like"])
def test_stacked_forward_is_each_models_forward(cfg, mnist):
    """The batched-weights forward of k models equals ViT.forward with each model's own weights, and so do the
    gradients it gives each model's weights."""
    models = [build_model(cfg, seed=seed) for seed in SEEDS]
    pixels = torch.stack([to_pixels(mnist.train_images[i * 32:(i + 1) * 32]) for i in range(len(models))])
    names = [name for name, _ in models[0].named_parameters()]
    params = {name: torch.stack([dict(m.named_parameters())[name].detach() for m in models]).requires_grad_()
              for name in names}
    got = stacked_forward(models[0], params, pixels)
    got.square().sum().backward()
    for i, model in enumerate(models):
        expected = model(pixels[i])
        assert torch.allclose(got[i], expected, rtol=0, atol=1e-5), (got[i] - expected).abs().max()
        expected.square().sum().backward()
        for name, p in model.named_parameters():
            assert torch.allclose(params[name].grad[i], p.grad, rtol=1e-4, atol=1e-5), name


def test_batched_folds_equal_sequential_fits(subset):
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu")
    seen = []
    got = fit_folds(MODEL, cfg, x, y, folds, SEEDS, progress=False,
                    callback=lambda fold, epoch, metrics: seen.append((fold, epoch, metrics["val_error"])))
    assert_same_training(sequential(cfg, x, y, folds), got, x, folds)
    assert [(f, e) for f, e, _ in seen] == [(f, e) for e in (1, 2) for f in range(3)]
    assert [v for f, e, v in seen if e == 2] == [r.final["val_error"] for r in got]
    assert all(type(r.model).__name__ == "ViT" and not r.model.training for r in got)


def test_split_k_folds_batched_equal_sequential_fits(subset, monkeypatch):
    """The split-K weight gradients of captured float32 CUDA steps, forced on the CPU: each fold trains as fit does."""
    from pipeline import batched

    plain = batched._linear
    monkeypatch.setattr(batched, "_linear", lambda x, weight, bias: plain(x, weight, bias, split_k=True))
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu")
    got = fit_folds(MODEL, cfg, x, y, folds, SEEDS, progress=False)
    assert_same_training(sequential(cfg, x, y, folds), got, x, folds)


def test_short_row_norm_folds_batched_equal_sequential_fits(subset, monkeypatch):
    """The LayerNorm that CUDA steps of models with at most SHORT_ROW_NORM_DIM features use, forced on the CPU: each
    fold trains as fit (torch.nn.LayerNorm) trains it."""
    from pipeline import batched

    plain = batched._layer_norm
    monkeypatch.setattr(batched, "_layer_norm", lambda *args: plain(*args, short_rows=True))
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu")
    got = fit_folds(MODEL, cfg, x, y, folds, SEEDS, progress=False)
    assert_same_training(sequential(cfg, x, y, folds), got, x, folds)


def test_short_row_norm_has_layer_norms_values_and_gradients():
    """_ShortRowNorm: float64 gradcheck; in float32 the values and gradients of F.layer_norm, with the stacked
    affine (per-fold weight and bias) around it; on the CPU the default stays F.layer_norm."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, 50, 8, dtype=torch.float64, generator=generator) * 3 + 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _ShortRowNorm.apply(t, 1e-5), (x,))
    weight = torch.randn(3, 8, generator=generator, requires_grad=True)
    bias = torch.randn(3, 8, generator=generator, requires_grad=True)
    inputs = (x.detach().float().requires_grad_(), weight, bias)
    upstream = torch.randn(3, 4, 50, 8, generator=generator)
    results = []
    for short in (True, False):
        out = _layer_norm(*inputs, 1e-5, short_rows=short)
        results.append((out, torch.autograd.grad(out, inputs, upstream)))
    (out, grads), (expected, expected_grads) = results
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(_layer_norm(*inputs, 1e-5), expected)  # the CPU's default: F.layer_norm


@pytest.mark.parametrize("stem,pool", [("conv", "cls"), ("conv-pool", "cls"), ("conv", "mean")])
def test_conv_stem_folds_batched_equal_sequential_fits(subset, stem, pool):
    """The conv stems' grouped convolutions (one per layer for all k folds) train each fold as fit trains it, eagerly
    and on the CUDA-graph path rehearsed on the CPU (the strong preset's CV and retraining on a GPU: conv stems,
    mean pooling).

    The preset's own pairing, max-pooled stem and mean pooling, is not compared over whole epochs here: there the
    max-pool's choice among near-equal activations flips with the last bit of the convolution's rounding, and the
    stem's weights drift apart by 2-3e-4 in 2 epochs (fit against itself with 1 and with 2 threads: 2.8e-4; batched
    against fit: 2.2e-4), beyond this test's 1e-4. Its forward and gradients are compared step-wise in
    test_stacked_forward_is_each_models_forward."""
    x, y, folds = subset
    model = MODEL.model_copy(update={"stem": stem, "stem_channels": 4, "pool": pool})
    cfg = TrainConfig(epochs=1, batch_size=128, device="cpu", optimizer="adamw", weight_decay=0.05, grad_clip=1.0)
    expected = sequential(cfg, x, y, folds, model)
    assert_same_training(expected, fit_folds(model, cfg, x, y, folds, SEEDS, progress=False), x, folds)
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    graphed = train_stacked(model, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=True)
    assert_same_training(expected, graphed, x, folds)


def test_with_augmentation_schedule_label_smoothing_clipping_and_weight_decay(subset):
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu", optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=0.5, min_lr=1e-4, label_smoothing=0.1, grad_clip=0.5,
                      augment=AugmentConfig(rotation=10, translate=0.1, scale=(0.9, 1.1), shear=5, erasing=0.3))
    assert_same_training(sequential(cfg, x, y, folds), fit_folds(MODEL, cfg, x, y, folds, SEEDS, progress=False),
                         x, folds)


def test_folds_of_unequal_size_take_their_own_number_of_steps(subset):
    """1000, 963 and 1130 images in batches of 128: 8, 8 and 9 steps per epoch with last batches of 104, 67 and
    106. Fold 1 and 2 sit out the 9th step of every epoch; their learning-rate schedules run on 8 steps an epoch."""
    x, y, _ = subset
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    folds = [(order[:1000], order[1000:1400]), (order[1000:1963], order[:500]), (order[1100:2230], order[:300])]
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu", weight_decay=1e-3, schedule="cosine",
                      warmup_epochs=0.5, grad_clip=1.0)
    assert_same_training(sequential(cfg, x, y, folds), fit_folds(MODEL, cfg, x, y, folds, SEEDS, progress=False),
                         x, folds)


def test_divergence_names_the_fold_and_should_stop_aborts(subset):
    x, y, folds = subset
    with pytest.raises(TrainingDiverged, match=r"cfg fold 1/3: .* in epoch 1 \(train.lr=1e\+30\)") as raised:
        fit_folds(MODEL, TrainConfig(epochs=1, lr=1e30, device="cpu"), x, y, folds, SEEDS, progress=False,
                  desc="cfg")
    assert raised.value.fold == 0
    with pytest.raises(TrainingAborted, match="stopped in epoch 1"):
        fit_folds(MODEL, TrainConfig(epochs=1, device="cpu"), x, y, folds, SEEDS, progress=False,
                  should_stop=lambda: True)


def test_graph_path_rehearsed_on_cpu_trains_as_the_eager_path(subset):
    """The CUDA-graph path (static step inputs, a device step counter, warm-up steps whose effect is undone before
    the capture) rehearsed on the CPU: the same training as sequential fits, so the warm-up leaves no trace."""
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu", optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=0.5, label_smoothing=0.1, grad_clip=0.5)
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    got = train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=True)
    assert_same_training(sequential(cfg, x, y, folds), got, x, folds)


def test_a_failing_fused_attention_kernel_falls_back_to_written_out_attention(subset, monkeypatch):
    """A training step whose fused attention kernel fails (as CUDA's memory-efficient backward once did under an
    earlier vmap version of the stacked step) is retried with attention written out: a warning naming the error,
    then the same training. Fault injection: SDPA raises whenever gradients are on (training, not evaluation)."""
    x, y, folds = subset
    cfg = TrainConfig(epochs=1, batch_size=128, device="cpu")
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    expected = sequential(cfg, x, y, folds)
    fused = torch.nn.functional.scaled_dot_product_attention

    def failing(*args, **kwargs):
        if torch.is_grad_enabled():
            raise RuntimeError("LSE is not correctly aligned (strideH)")
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", failing)
    with pytest.warns(RuntimeWarning, match=r"fused attention kernel failed \(RuntimeError: LSE is not correctly"):
        got = train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=True)
    assert_same_training(expected, got, x, folds)
    with pytest.raises(RuntimeError, match="LSE is not correctly aligned"):  # no warm-up to retry from
        train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=False)


def test_one_stacked_model_is_fit_with_padded_last_batch(subset):
    """fit on CUDA runs as train_stacked with k = 1 (the captured step needs one batch shape: the last batch is
    padded with zero-weight samples). 1000 images in batches of 96: 11 steps, the last of 40 images."""
    x, y, folds = subset
    tr, va = folds[0]
    tr = tr[:1000]
    cfg = TrainConfig(epochs=2, batch_size=96, device="cpu", schedule="cosine", warmup_epochs=0.5, grad_clip=1.0)
    expected = fit(MODEL, cfg, x[tr], y[tr], {"test": (x[va], y[va])}, seed=SEEDS[0], progress=False)
    seen = []
    got = train_stacked(MODEL, cfg, x[tr], y[tr], [None], SEEDS[:1], [{"test": (x[va], y[va])}], progress=False,
                        graph=True, callback=lambda f, epoch, m: seen.append((f, epoch)))
    assert seen == [(0, 1), (0, 2)]
    assert_same_training([expected], got, x, [(tr, va)])
    with pytest.raises(TrainingDiverged, match=r"^one: training loss is nan in epoch 1"):
        train_stacked(MODEL, cfg.model_copy(update={"lr": 1e30}), x[tr], y[tr], [None], [0], [{}], progress=False,
                      desc="one")


def test_cuda_graph_is_wanted_unless_dropout_or_compile():
    cuda = torch.device("cuda")
    plain = TrainConfig()
    assert graph_wanted(plain, MODEL, cuda)
    assert not graph_wanted(plain, MODEL, torch.device("cpu"))
    assert not graph_wanted(plain.model_copy(update={"cuda_graph": "off"}), MODEL, cuda)
    assert not graph_wanted(plain.model_copy(update={"compile": "default"}), MODEL, cuda)
    assert graph_wanted(plain.model_copy(update={"augment": AugmentConfig(rotation=10)}), MODEL, cuda)
    assert not graph_wanted(plain, MODEL.model_copy(update={"dropout": 0.1}), cuda)


def test_split_k_linear_has_autograds_gradients():
    """The stacked linear layer with its split-K weight gradient (what captured float32 CUDA steps train with):
    float64 gradcheck, and float32 gradients equal to the plain batched product's, with and without bias."""
    assert (_split_k(128 * 50), _split_k(6272), _split_k(96), _split_k(128 * 49 + 1)) == (32, 32, 1, 1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 64, 5, dtype=torch.float64, generator=generator, requires_grad=True)  # 256 rows: 4 chunks
    weight = torch.randn(3, 7, 5, dtype=torch.float64, generator=generator, requires_grad=True)
    bias = torch.randn(3, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: _linear(*a, split_k=True), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda *a: _linear(*a, None, split_k=True), (x, weight))
    for with_bias in (True, False):
        inputs = [t.detach().float().requires_grad_() for t in (x, weight, bias)]
        grads = []
        for split in (True, False):
            out = _linear(inputs[0], inputs[1], inputs[2] if with_bias else None, split_k=split)
            grads.append(torch.autograd.grad((out * out).sum(), inputs[:3 if with_bias else 2]))
        for got, expected in zip(*grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def reference_step_table(cfg, steps):
    """The step table's definition, row by row: (rows, k) per constant, as torch.optim.Adam / AdamW compute them."""
    factors, fading = [lr_factor(cfg, n) for n in steps], [augment_strength(cfg, n) for n in steps]
    rows = {name: [] for name in _StepTable.__dataclass_fields__}
    for epoch in range(cfg.epochs):
        for step in range(max(steps)):
            for name in rows:
                rows[name].append([])
            for fold, n in enumerate(steps):
                active, done = step < n, epoch * n + min(step, n - 1)
                lr, t = cfg.lr * factors[fold](done), done + 1
                for name, value in {"neg_step_size": -lr / (1 - BETA1**t) if active else 0.0,
                                    "bias2_sqrt": (1 - BETA2**t) ** 0.5,
                                    "decay": 1 - lr * cfg.weight_decay if active and cfg.optimizer == "adamw" else 1,
                                    "w1": 1 - BETA1 if active else 0.0, "b2": BETA2 if active else 1.0,
                                    "w2": 1 - BETA2 if active else 0.0,
                                    "ema_w": ema_weight(cfg.ema_decay, done) if active and cfg.ema_decay else 0.0,
                                    "aug": fading[fold](done)}.items():
                    rows[name][-1].append(value)
    return {name: torch.tensor(values, dtype=torch.float32) for name, values in rows.items()}


@pytest.mark.parametrize("update", [{}, {"optimizer": "adam", "schedule": "constant"}, {"ema_decay": 0.99}],
                         ids=["adamw-cosine-fade", "adam-constant", "ema"])
def test_step_table_holds_each_folds_constants_step_by_step(update):
    """The table laid out by index equals its row-by-row definition, bit for bit, for folds of unequal length (the
    shorter ones sit out the last step of each epoch)."""
    cfg = TrainConfig(epochs=7, lr=0.002, optimizer="adamw", weight_decay=0.05, schedule="cosine", warmup_epochs=2,
                      min_lr=1e-5, augment=AugmentConfig(rotation=10, anneal=0.4)).model_copy(update=update)
    steps = [12, 11, 11]
    table, expected = _step_table(cfg, steps, torch.device("cpu")), reference_step_table(cfg, steps)
    for name, values in expected.items():
        got = getattr(table, name)
        assert got.shape == (7 * 12, 3, 1), name
        assert torch.equal(got.squeeze(-1), values), name
    assert (table.neg_step_size[11::12, 1:] == 0).all() and (table.neg_step_size[11::12, 0] < 0).all()


def test_graph_path_captures_augmentation(subset):
    """With augmentation the graph path augments whole batches (fixed shapes, one draw per row): with batches that
    divide the folds (1500 = 12 x 125) that is exactly what fit draws, so the runs agree; the warm-up's draws are
    undone along with its steps."""
    x, y, folds = subset
    cfg = TrainConfig(epochs=2, batch_size=125, device="cpu", label_smoothing=0.1,
                      augment=AugmentConfig(rotation=10, translate=0.1, scale=(0.9, 1.1), elastic_alpha=20,
                                            elastic_sigma=4, erasing=0.3))
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    got = train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=True)
    assert_same_training(sequential(cfg, x, y, folds), got, x, folds)


def test_a_planned_epoch_count_rewrites_the_captured_steps_schedule(subset, monkeypatch):
    """Under a time limit the count is set after 2 epochs (here 3 of 6, standing in for the clock); the graph path
    then rewrites its optimizer table in place, where a captured graph reads it, and trains as eager fit does."""
    from pipeline import train as train_lib

    monkeypatch.setattr(train_lib, "epochs_within", lambda *args: 3)
    x, y, folds = subset
    tr, va = folds[0]
    cfg = TrainConfig(epochs=6, batch_size=128, device="cpu", optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=1, min_lr=1e-4)
    evals = {"test": (x[va], y[va])}
    plans = []
    expected = fit(MODEL, cfg, x[tr], y[tr], evals, seed=SEEDS[0], progress=False, time_limit_s=60.0)
    got = train_stacked(MODEL, cfg, x[tr], y[tr], [None], SEEDS[:1], [evals], progress=False, graph=True,
                        time_limit_s=60.0, on_plan=lambda n, why: plans.append(n))
    assert plans == [3] and len(got[0].history) == 3
    assert_same_training([expected], got, x, [(tr, va)])
    assert got[0].history[-1]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-rehearsal"])
def test_weight_average_folds_batched_equal_sequential_fits(subset, graph):
    """train.ema_decay: each fold's moving average of its weights, updated after each of its own steps (folds of
    unequal size sit some out), is what the stacked run evaluates and returns, as fit's AveragedModel; the trained
    weights' figures come beside it as val_loss_raw/val_error_raw."""
    x, y, _ = subset
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    folds = [(order[:1000], order[1000:1400]), (order[1000:1963], order[:500]), (order[1100:2230], order[:300])]
    cfg = TrainConfig(epochs=2, batch_size=128, device="cpu", optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=0.5, grad_clip=1.0, ema_decay=0.9)
    expected = sequential(cfg, x, y, folds)
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    got = train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=graph)
    assert_same_training(expected, got, x, folds)
    assert list(got[0].history[-1]) == ["train_loss", "train_error", "lr", "val_loss", "val_error", "val_loss_raw",
                                        "val_error_raw", "epoch_seconds"]
    plain = sequential(cfg.model_copy(update={"ema_decay": None}), x, y, folds)
    for averaged, trained in zip(expected, plain):  # the raw figures are the training without an average
        for a, b in zip(averaged.history, trained.history):
            assert a["val_error_raw"] == pytest.approx(b["val_error"], abs=1e-4)
        gaps = torch.cat([(p - q).detach().abs().flatten()
                          for p, q in zip(averaged.model.parameters(), trained.model.parameters())])
        # the delivered model is the average, not the trained weights: apart by more than assert_same_training allows
        assert gaps.max() > FAR and int((gaps > CLOSE).sum()) > len(gaps) // OUTLIERS


FADING = AugmentConfig(rotation=15, translate=0.1, scale=(0.9, 1.1), elastic_alpha=20, erasing=0.3, anneal=0.6)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-rehearsal"])
def test_fading_augmentation_folds_batched_equal_sequential_fits(subset, graph):
    """train.augment.anneal: each fold's augmentation fades over its own last steps, as in fit. Eagerly with folds
    of unequal size (their own step counts); on the graph path, whose strength is a column of the step table, with
    batches that divide the folds (the graph path's draws are fit's only then)."""
    x, y, folds = subset
    if not graph:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        folds = [(order[:1000], order[1000:1400]), (order[1000:1963], order[:500]), (order[1100:2230], order[:300])]
    cfg = TrainConfig(epochs=2, batch_size=128 if not graph else 125, device="cpu", label_smoothing=0.1,
                      augment=FADING)
    expected = sequential(cfg, x, y, folds)
    vals = [{"val": (x[va], y[va])} for _, va in folds]
    got = train_stacked(MODEL, cfg, x, y, [tr for tr, _ in folds], SEEDS, vals, progress=False, graph=graph)
    assert_same_training(expected, got, x, folds)
    first, last = (m["augment_strength"] for m in got[0].history)  # (fit's too: compared above)
    assert 0.5 < first < 1 and last == 0.0  # the fade starts in the first epoch, ends at the last step
    full = sequential(cfg.model_copy(update={"augment": FADING.model_copy(update={"anneal": 0.0})}), x, y, folds)
    assert full[0].history[1]["train_loss"] != pytest.approx(expected[0].history[1]["train_loss"], abs=1e-4)


def test_a_planned_epoch_count_rewrites_the_captured_augmentation_fade(subset, monkeypatch):
    """3 of 6 epochs planned after 2: the fade over the last 60% of the steps moves from epochs 3.6-6 to 1.8-3, in
    the step table a captured graph reads, as fit moves it."""
    from pipeline import train as train_lib

    monkeypatch.setattr(train_lib, "epochs_within", lambda *args: 3)
    x, y, folds = subset
    tr, va = folds[0]
    cfg = TrainConfig(epochs=6, batch_size=125, device="cpu", augment=FADING)
    evals = {"test": (x[va], y[va])}
    expected = fit(MODEL, cfg, x[tr], y[tr], evals, seed=SEEDS[0], progress=False, time_limit_s=60.0)
    got = train_stacked(MODEL, cfg, x[tr], y[tr], [None], SEEDS[:1], [evals], progress=False, graph=True,
                        time_limit_s=60.0)
    assert len(got[0].history) == 3 and got[0].history[-1]["augment_strength"] == 0.0
    assert_same_training([expected], got, x, [(tr, va)])


def test_a_later_cut_rewrites_the_rest_of_the_captured_schedule(subset, monkeypatch):
    """A pace that slowed after the plan (here: all 6 planned after epoch 2, cut to 4 after epoch 3, standing in
    for the clock under a spent limit): the graph path rewrites the steps left of its table (cosine and fade end at
    epoch 4), and trains as eager fit does under the same cut."""
    from pipeline import train as train_lib

    monkeypatch.setattr(train_lib, "epochs_within", lambda limit, most, done, elapsed, pace: 6 if done == 2 else 4)
    x, y, folds = subset
    tr, va = folds[0]
    cfg = TrainConfig(epochs=6, batch_size=125, device="cpu", optimizer="adamw", weight_decay=0.05,
                      schedule="cosine", warmup_epochs=1, min_lr=1e-4, augment=FADING)
    evals = {"test": (x[va], y[va])}
    heard = []
    expected = fit(MODEL, cfg, x[tr], y[tr], evals, seed=SEEDS[0], progress=False, time_limit_s=0.0,
                   on_plan=lambda n, why: heard.append(n))
    got = train_stacked(MODEL, cfg, x[tr], y[tr], [None], SEEDS[:1], [evals], progress=False, graph=True,
                        time_limit_s=0.0, on_plan=lambda n, why: heard.append(n))
    assert heard == [6, 4, 6, 4] and len(got[0].history) == 4
    assert_same_training([expected], got, x, [(tr, va)])
    assert got[0].history[-1]["lr"] == pytest.approx(1e-4) and got[0].history[-1]["augment_strength"] == 0.0
    uncut = fit(MODEL, cfg, x[tr], y[tr], evals, seed=SEEDS[0], progress=False)
    losses = [[m["train_loss"] for m in run.history[:4]] for run in (uncut, expected)]
    assert losses[0][:3] == losses[1][:3] and losses[0][3] != losses[1][3]  # the cut changed what followed it only
