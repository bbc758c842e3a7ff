import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import build_model
from pipeline.train import TrainingDiverged, evaluate, fit


@pytest.fixture(scope="module")
def subset(mnist):
    return mnist.train_images[:3000], mnist.train_labels[:3000], mnist.test_images[:1000], mnist.test_labels[:1000]


def test_one_epoch_on_real_data_lowers_the_loss(subset):
    x, y, xt, yt = subset
    cfg = ModelConfig(depth=2, mlp_hidden=16)
    before_loss, before_error = evaluate(build_model(cfg, seed=0), xt, yt)
    seen = []
    result = fit(cfg, TrainConfig(epochs=2, batch_size=128, device="cpu"), x, y, {"val": (xt, yt)}, seed=0,
                 callback=lambda epoch, m: seen.append((epoch, m)), progress=False)
    assert [e for e, _ in seen] == [1, 2]
    assert set(seen[0][1]) >= {"train_loss", "train_error", "val_loss", "val_error"}
    assert result.history[-1]["val_loss"] < before_loss - 0.2
    assert result.history[-1]["val_error"] < before_error - 0.05


def test_training_is_deterministic_on_cpu(subset):
    x, y, xt, yt = subset
    args = (ModelConfig(depth=1), TrainConfig(epochs=1, device="cpu"), x[:1000], y[:1000], {"val": (xt, yt)})
    a = fit(*args, seed=7, progress=False)
    b = fit(*args, seed=7, progress=False)
    c = fit(*args, seed=8, progress=False)
    strip = lambda h: [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) != strip(c.history)
    assert all(torch.equal(p, q) for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_divergence_is_reported(subset):
    x, y, _, _ = subset
    with pytest.raises(TrainingDiverged, match="train.lr=1e\\+30"):
        fit(ModelConfig(depth=1), TrainConfig(epochs=1, lr=1e30, device="cpu"), x[:512], y[:512], progress=False)
