"""Progress lines of a long training (pipeline.report.EpochProgress): when they come and what they say."""

from pipeline.report import EpochProgress, duration


def test_duration():
    assert [duration(s) for s in (0, 12.4, 59.6, 245, 3600, 7625)] == [
        "0 s", "12 s", "1 min 00 s", "4 min 05 s", "1 h 00 min", "2 h 07 min"]


def test_first_epoch_then_every_30_seconds_then_the_last():
    now = [0.0]
    lines: list[str] = []
    progress = EpochProgress("final depth=4", 10, lines.append, every=30.0, clock=lambda: now[0])
    # epoch 1 is slow (on CUDA: warm-up and graph capture), the others take 12 s each
    for epoch in range(1, 11):
        now[0] += 20.0 if epoch == 1 else 12.0
        progress(epoch, {"train_loss": 0.5, "train_error": 0.1, "test_loss": 0.1, "test_error": 0.02,
                         "epoch_seconds": 20.0 if epoch == 1 else 12.0})
    epochs = [line.split("epoch ")[1].split(",")[0] for line in lines]
    # first; then 36 s after it (epoch 4), 36 s later (epoch 7), 36 s later (epoch 10, also the last)
    assert epochs == ["1/10", "4/10", "7/10", "10/10"], lines
    assert lines[0] == ("final depth=4: epoch 1/10, test_error 0.0200, train_loss 0.5000, 20.0 s per epoch, "
                        "about 3 min 00 s left")
    assert "12.0 s per epoch, about 1 min 12 s left" in lines[1]  # the first epoch's 20 s left out
    assert lines[-1].endswith("12.0 s per epoch, 2 min 08 s in all"), lines[-1]
    assert "train_error" not in lines[-1]


def test_a_one_epoch_training_reports_once():
    lines: list[str] = []
    EpochProgress("final", 1, lines.append)(1, {"val_error": 0.1, "epoch_seconds": 3.0})
    assert lines == ["final: epoch 1/1, val_error 0.1000, 3.0 s per epoch, 3 s in all"]
