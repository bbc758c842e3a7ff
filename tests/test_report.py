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


def _run(progress: EpochProgress, now: list[float], seconds: list[float]) -> None:
    for epoch, s in enumerate(seconds, 1):
        now[0] += s
        progress(epoch, {"val_error": 0.05, "epoch_seconds": s})


def test_quiet_says_nothing_for_a_short_training():
    now, lines = [0.0], []
    _run(EpochProgress("blocks=2 fold 1/3", 5, lines.append, quiet=True, clock=lambda: now[0]), now, [2.0] * 5)
    assert lines == []


def test_quiet_reports_a_long_training_from_its_first_epoch():
    now, lines = [0.0], []
    _run(EpochProgress("depth=4 fold 1/2", 3, lines.append, quiet=True, clock=lambda: now[0]), now, [40.0] * 3)
    assert [line.split(", ")[0] for line in lines] == ["depth=4 fold 1/2: epoch 1/3", "depth=4 fold 1/2: epoch 2/3",
                                                        "depth=4 fold 1/2: epoch 3/3"]


def test_quiet_speaks_up_when_a_training_turns_out_slower_than_its_first_epoch_said():
    now, lines = [0.0], []
    # the first epoch promises 4 x 5 s; the next take 20 s: a line once 30 s have passed (epoch 3, at 45 s), the last
    _run(EpochProgress("fold", 4, lines.append, quiet=True, clock=lambda: now[0]), now, [5.0, 20.0, 20.0, 20.0])
    assert [line.split(", ")[0] for line in lines] == ["fold: epoch 3/4", "fold: epoch 4/4"], lines


def test_fold_tasks_and_the_retraining_report_through_the_study_steps(data_root, tmp_path, monkeypatch):
    """The steps the flow's tasks call pass their progress to ``log``: one fold, the k batched folds (a line per
    fold), the retraining. With PROGRESS_EVERY_S at 0 every epoch is due, so even the smoke preset's folds speak."""
    from pipeline import study as steps
    from pipeline.config import load_config
    from pipeline.data import load, verify
    from pipeline.tracking import Tracker

    monkeypatch.setattr(steps, "PROGRESS_EVERY_S", 0.0)
    cfg = load_config("smoke", ["tracking.experiment=progress", "train.device=cpu", "cv.grid={model.depth: [1]}",
                                "data.train_subset=600", "data.test_subset=200"])
    study = steps.Study(cfg=cfg, data=load(cfg.data, root=data_root, md5=verify(data_root)),
                        tracker=Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", cfg.experiment_name))
    steps.start_study(study)
    configuration = steps.start_configuration(study, 0)
    one, batched, final = [], [], []
    results = [steps.train_fold(study, 0, 0, configuration, log=one.append)]
    results += steps.train_folds_batched(study, 0, configuration, log=batched.append)[1:]
    leaderboard = steps.aggregate(study, results)
    steps.close_configuration(study, leaderboard[0], configuration)
    steps.retrain(study, leaderboard, log=final.append)
    study.tracker.end_run(study.run_id)
    label = study.candidates[0].label
    assert [line.split(", val_error")[0] for line in one] == [f"{label} fold 1/2: epoch 1/2",
                                                              f"{label} fold 1/2: epoch 2/2"], one
    assert sorted(line.split(", val_error")[0] for line in batched) == [
        f"{label} fold {f}/2: epoch {e}/2" for f in (1, 2) for e in (1, 2)], batched
    assert [line.split(", test_error")[0] for line in final] == [f"final {label}: epoch 1/2",
                                                                 f"final {label}: epoch 2/2"], final


def test_a_retraining_cut_by_a_slower_pace_is_tagged_and_reported(data_root, tmp_path, monkeypatch):
    """The retraining's plan is its epochs_planned parameter; a later cut (here: all 5 planned after epoch 2, 3
    after epoch 3, standing in for a clock that slowed under a spent limit) its epochs_cut_to tag, as parameters
    cannot change; the progress lines count to the new end and say why."""
    from mlflow import MlflowClient

    from pipeline import study as steps
    from pipeline import train as train_lib
    from pipeline.config import load_config
    from pipeline.data import load, verify
    from pipeline.tracking import Tracker

    from ._consume import mlflow_store

    monkeypatch.setattr(train_lib, "epochs_within", lambda limit, most, done, elapsed, pace: 5 if done == 2 else 3)
    cfg = load_config("smoke", ["tracking.experiment=cut", "train.device=cpu", "cv.grid={model.depth: [1]}",
                                "train.epochs=5", "data.train_subset=600", "data.test_subset=200"])
    with mlflow_store(tmp_path) as uri:  # the Tracker sets the global tracking URI: put back afterwards
        study = steps.Study(cfg=cfg, data=load(cfg.data, root=data_root, md5=verify(data_root)),
                            tracker=Tracker(uri, cfg.experiment_name))
        steps.start_study(study)
        configuration = steps.start_configuration(study, 0)
        leaderboard = steps.aggregate(study, [steps.train_fold(study, 0, f, configuration) for f in range(2)])
        steps.close_configuration(study, leaderboard[0], configuration)
        lines = []
        _, run_id = steps.retrain(study, leaderboard, log=lines.append, time_limit_s=0.0)
        study.tracker.end_run(run_id)
        study.tracker.end_run(study.run_id)
        run = MlflowClient(uri).get_run(run_id)
        assert run.data.params["epochs_planned"] == "5" and run.data.tags["epochs_cut_to"] == "3"
        assert [m.step for m in MlflowClient(uri).get_metric_history(run_id, "test_error")] == [1, 2, 3]
    assert any("the pace slowed to" in line and "3 instead of 5 epochs fit" in line for line in lines), lines
    assert lines[-1].startswith(f"final {study.candidates[0].label}: epoch 3/3"), lines
