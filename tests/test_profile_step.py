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
    assert per_step, out
    # both printed rounded (seconds to 1 ms, ms per step to 0.01 ms): they agree up to that rounding
    assert abs(3 * float(per_step[2]) / 1000 - float(per_step[1])) <= 0.0005 + 3 * 0.005 / 1000 + 1e-9, out
    table = out.split("```")[1]
    body = re.split(r"^-[- ]+$", table, flags=re.M)[2]  # the rows between the header's rule and the closing one
    rows = [line.split()[0] for line in body.splitlines() if line.strip()]
    assert len(rows) == 5, table  # --rows entries, by CPU time on a CPU: operators, and the optimizer's step maybe
    assert sum(name.startswith("aten::") for name in rows) >= 2, table


def test_profile_rejects_a_count_below_one_and_a_bad_override(capsys) -> None:
    for argv, message in ((["--images", "0"], "--images and --rows must be at least 1"),
                          (["--config", "smoke", "--set", "train.batch_size=zero"], "batch_size")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
