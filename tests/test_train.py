import pytest
import torch

from pipeline.config import ModelConfig, TrainConfig
from pipeline.model import build_model
from pipeline import train as train_lib
from pipeline.train import PACE_MARGIN, EpochPlan, TrainingDiverged, ema_weight, epochs_within, evaluate, fit


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


def strip(history):
    return [{k: v for k, v in m.items() if k != "epoch_seconds"} for m in history]


def test_epochs_within_a_time_limit():
    # 90 s left at 5 s per epoch (5.15 s with the margin): 17 more after the 2 done
    assert epochs_within(100, 50, 2, 10, 5) == 2 + int(90 / (5 * PACE_MARGIN)) == 19
    assert epochs_within(1e6, 50, 2, 10, 5) == 50  # never more than train.epochs
    assert epochs_within(0, 50, 2, 10, 5) == 2  # the limit already spent: the epochs done, none more
    assert epochs_within(-30, 50, 2, 10, 5) == 2


def test_a_slower_pace_later_cuts_the_planned_count():
    """EpochPlan, fed the seconds since the start at the end of each epoch: planned after 2, then cut when the
    epochs left would end past the limit at the mean pace since the first epoch; never grown back."""
    heard = []
    plan = EpochPlan(TrainConfig(epochs=50), 100.0, lambda n, why: heard.append((n, why)), "final")
    assert plan.replan(1, 10.0) is None  # the first epoch (one-time costs): no plan yet
    assert plan.replan(2, 20.0).epochs == 2 + int(80 / (10 * PACE_MARGIN)) == 9
    assert plan.replan(3, 30.0) is None and plan.replan(4, 40.0) is None  # on pace: 40 + 5 x 10 s <= 100
    assert plan.replan(5, 55.0) is None  # 15 s, but the mean since epoch 1 (11.25 s) still ends at 100
    cut = plan.replan(6, 75.0)  # mean 13 s: 75 + 3 x 13 > 100; 25 s left fit 1 more at 13.39 s
    assert cut is not None and cut.epochs == plan.epochs == 7
    assert [n for n, _ in heard] == [9, 7]
    assert heard[1][1] == ("final: the pace slowed to 13.00 s per epoch (75.0 s for the first 6); 7 instead of 9 "
                           "epochs fit the time limit of 100 s")
    assert plan.replan(7, 80.0) is None  # the last epoch: nothing to plan, and a faster pace adds none back
    assert EpochPlan(TrainConfig(epochs=50), None, None, "").replan(3, 1e9) is None  # no limit, no plan

    stop = EpochPlan(TrainConfig(epochs=10), 30.0, None, "")  # a limit passed: the epoch just done is the last
    stop.replan(1, 5.0)
    assert stop.replan(2, 10.0).epochs == 5 and stop.replan(3, 40.0).epochs == 3


def test_one_off_seconds_count_against_the_limit_but_not_in_the_pace():
    """A caller that rebuilds its schedule after a plan says how long that took: the pace leaves it out (no second
    cut for a plan's own cost), while the limit still counts it (the epochs left must end in time)."""
    def planned(one_off_s):
        plan = EpochPlan(TrainConfig(epochs=50), 100.0, None, "")
        plan.replan(1, 10.0)
        assert plan.replan(2, 20.0).epochs == 9
        return plan.replan(3, 35.0, one_off_s)  # epoch 3 took 15 s, 5 of them rebuilding

    assert planned(5.0) is None  # pace 10 s: 35 + 6 x 10 <= 100
    assert planned(0.0).epochs == 3 + int(65 / (12.5 * PACE_MARGIN)) == 8  # pace 12.5 s: 35 + 6 x 12.5 > 100
    plan = EpochPlan(TrainConfig(epochs=50), 100.0, None, "")
    plan.replan(1, 10.0)
    plan.replan(2, 20.0)
    assert plan.replan(3, 95.0, 65.0).epochs == 3  # a 10 s pace, but 5 s of the limit left: this epoch is the last


def test_fit_cuts_its_epochs_when_the_machine_slows_down(subset):
    """A real slowdown (the third epoch's callback sleeps past the limit): the count planned after epoch 2 (all 8
    at a quick pace; at least 5 unless an epoch takes over 2 s) is cut to the 4 done once the pace says no more
    fit; the cosine is refitted to end at min_lr there."""
    import time

    x, y, xt, yt = subset
    cfg = TrainConfig(epochs=8, batch_size=250, device="cpu", optimizer="adamw", schedule="cosine", min_lr=1e-4)
    plans = []
    result = fit(ModelConfig(depth=1), cfg, x[:1000], y[:1000], {"val": (xt[:200], yt[:200])}, seed=3,
                 progress=False, time_limit_s=12.0, on_plan=lambda n, why: plans.append(n),
                 callback=lambda epoch, m: time.sleep(13.0) if epoch == 3 else None)
    assert len(plans) == 2 and plans[0] > 4 and plans[1] == 4 and len(result.history) == 4
    assert result.history[-1]["lr"] == pytest.approx(1e-4)


def test_a_spent_time_limit_stops_after_the_pace_is_measured(subset):
    """With no time left, fit trains the 2 epochs it needs to measure its pace and stops: with a 2-epoch warm-up,
    exactly the training of a 2-epoch run (the schedule fitted to the new count, the learning rate used so far
    unchanged). on_plan hears the count and why."""
    x, y, xt, yt = subset
    cfg = TrainConfig(epochs=5, batch_size=128, device="cpu", optimizer="adamw", schedule="cosine",
                      warmup_epochs=2, min_lr=1e-4)
    args = (ModelConfig(depth=1), cfg, x[:1000], y[:1000], {"val": (xt, yt)})
    plans = []
    budgeted = fit(*args, seed=3, progress=False, time_limit_s=0.0, on_plan=lambda n, why: plans.append((n, why)))
    short = fit(args[0], cfg.model_copy(update={"epochs": 2}), *args[2:], seed=3, progress=False)
    assert len(budgeted.history) == 2 and strip(budgeted.history) == strip(short.history)
    assert all(torch.equal(p, q) for p, q in zip(budgeted.model.parameters(), short.model.parameters()))
    assert len(plans) == 1 and plans[0][0] == 2 and "2 of 5 epochs fit the time limit of 0 s" in plans[0][1]

    plans.clear()  # a limit that holds every epoch: the count stays, on_plan still says so
    ample = fit(*args, seed=3, progress=False, time_limit_s=3600.0, on_plan=lambda n, why: plans.append(n))
    assert len(ample.history) == 5 and plans == [5]


def test_a_planned_count_refits_the_schedule(subset, monkeypatch):
    """The count set after 2 epochs (here 3 of 6, standing in for what the clock would give) trains as a run of 3:
    the cosine then decays to min_lr at the new end."""
    monkeypatch.setattr(train_lib, "epochs_within", lambda *args: 3)
    x, y, xt, yt = subset
    cfg = TrainConfig(epochs=6, batch_size=128, device="cpu", optimizer="adamw", schedule="cosine",
                      warmup_epochs=2, min_lr=1e-4)
    args = (ModelConfig(depth=1), cfg, x[:1000], y[:1000], {"val": (xt, yt)})
    planned = fit(*args, seed=3, progress=False, time_limit_s=60.0)
    three = fit(args[0], cfg.model_copy(update={"epochs": 3}), *args[2:], seed=3, progress=False)
    assert strip(planned.history) == strip(three.history)
    assert planned.history[-1]["lr"] == pytest.approx(1e-4)


def test_weight_average_warms_up_as_tensorflows_moving_average() -> None:
    """train.ema_decay's update weights: a copy first, then 1 - min(decay, (1 + n) / (10 + n)) after n updates."""
    assert ema_weight(0.9995, 0) == 1.0
    assert ema_weight(0.9995, 1) == pytest.approx(1 - 2 / 11)
    assert ema_weight(0.9995, 1000) == pytest.approx(1 - 1001 / 1010)
    assert ema_weight(0.9995, 17_990) == pytest.approx(0.0005)  # (10 * decay - 1) / (1 - decay) updates: the cap
    assert ema_weight(0.9995, 100_000) == pytest.approx(0.0005)
