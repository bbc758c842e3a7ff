"""bench/recipe_probe.py: a real (tiny) probe of a recipe, and how its summary and table read a run's history."""

from __future__ import annotations

import re

import pytest

from bench.recipe_probe import checkpoints, default_last, levelled_off, main, table


def test_checkpoints_are_every_nth_epoch_and_the_last() -> None:
    assert checkpoints(12, 5) == [5, 10, 12]
    assert checkpoints(10, 5) == [5, 10]
    assert checkpoints(3, 5) == [3]
    assert checkpoints(3, 1) == [1, 2, 3]


def test_levelled_off_averages_the_last_epochs_and_counts_their_errors() -> None:
    history = [{"test_error": e} for e in (0.0100, 0.0060, 0.0052, 0.0056, 0.0052)]
    assert levelled_off(history, 10_000, 3) == "last 3 epochs: mean test error 0.53%, 52-56 test errors of 10,000"
    assert levelled_off(history[:2], 10_000, 10).startswith("last 2 epochs: mean test error 0.80%, 60-100 ")


def test_the_levelled_off_mean_takes_the_last_fifth_of_a_run_by_default() -> None:
    assert [default_last(n) for n in (1, 4, 5, 15, 30, 50, 60, 200)] == [1, 1, 1, 3, 6, 10, 10, 10]


def test_table_shows_the_checkpoint_epochs_only() -> None:
    history = [{"test_error": i / 100, "train_error": i / 50} for i in range(1, 8)]
    lines = table(history, 5).splitlines()
    assert lines[0] == "| epoch | 5 | 7 |"
    assert lines[2] == "| test error | 5.00% | 7.00% |"
    assert lines[3] == "| train error (augmented) | 10.0% | 14.0% |"


def test_probe_trains_on_real_mnist_and_summarises_its_own_epochs(capsys) -> None:
    assert main(["--config", "smoke", "--epochs", "3", "--every", "2", "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "2000 training / 500 test images" in out
    errors = [float(e) for e in re.findall(r"^epoch +\d+ +test error ([0-9.]+)", out, re.M)]
    assert len(errors) == 3
    mean = re.search(r"last 2 epochs: mean test error ([0-9.]+)%, (\d+)-(\d+) test errors of 500", out)
    assert mean, out
    assert float(mean[1]) == pytest.approx(100 * (errors[1] + errors[2]) / 2, abs=0.006)
    assert (int(mean[2]), int(mean[3])) == tuple(sorted(round(e * 500) for e in errors[1:]))
    assert "| epoch | 2 | 3 |" in out


@pytest.mark.parametrize("flag", ["--every", "--last"])
def test_probe_rejects_a_count_below_one(flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--config", "smoke", flag, "0"])
    assert exc.value.code == 2
    assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_probe_with_a_weight_average_reports_the_trained_weights_beside_it(capsys) -> None:
    assert main(["--config", "smoke", "--epochs", "2", "--last", "2", "--set", "train.ema_decay=0.9"]) == 0
    out = capsys.readouterr().out
    pairs = re.findall(r"^epoch +\d+ +test error ([0-9.]+) \(trained weights ([0-9.]+)\)", out, re.M)
    assert len(pairs) == 2
    raw = re.search(r"without the weight average \(train.ema_decay\): final test accuracy ([0-9.]+)%; last 2 epochs: "
                    r"mean test error ([0-9.]+)%", out)
    assert raw, out
    assert float(raw[1]) == pytest.approx(100 * (1 - float(pairs[-1][1])), abs=0.006)
    assert float(raw[2]) == pytest.approx(100 * (float(pairs[0][1]) + float(pairs[1][1])) / 2, abs=0.006)
    assert "| test error, trained weights (no average) | " in out


def test_probe_with_a_fading_augmentation_prints_its_strength(capsys) -> None:
    assert main(["--config", "smoke", "--epochs", "2", "--set", "train.augment.rotation=10",
                 "--set", "train.augment.anneal=0.5"]) == 0
    out = capsys.readouterr().out
    strengths = re.findall(r"^epoch +\d+ .* augmentation ([0-9.]+) ", out, re.M)
    assert strengths == ["1.00", "0.00"]
    assert "; last 1 epochs: mean test error " in out  # no --last: a fifth of the 2 epochs, at least 1
    assert main(["--config", "smoke", "--epochs", "1", "--set", "train.augment.anneal=0.5"]) == 0
    assert " augmentation " not in capsys.readouterr().out  # nothing to fade without an augmentation
