"""bench/profile_step.py: a real (tiny) profile of a preset's training step on MNIST."""

from __future__ import annotations

import re

import pytest

from bench.profile_step import main


def test_profile_times_the_step_and_lists_the_top_operators(capsys) -> None:
    assert main(["--config", "smoke", "--images", "300", "--rows", "5", "--set", "train.batch_size=128"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"300 images = 3 steps of 128", out), out
    per_step = re.search(r"fit, one epoch: ([0-9.]+) s, ([0-9.]+) ms per step", out)
    assert per_step and float(per_step[2]) == pytest.approx(1000 * float(per_step[1]) / 3, rel=0.01)
    table = out.split("```")[1]
    assert len(re.findall(r"^ +aten::\S+", table, re.M)) == 5  # --rows operators, by CPU time on a CPU


def test_profile_rejects_a_count_below_one_and_a_bad_override(capsys) -> None:
    for argv, message in ((["--images", "0"], "--images and --rows must be at least 1"),
                          (["--config", "smoke", "--set", "train.batch_size=zero"], "batch_size")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
