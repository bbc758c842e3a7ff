"""bench/gpu_check.sh's helpers: the strong-tuned stage's epoch plan, the verdict read from a check's output, and
the wheelhouse's pruning of wheels another wheel already holds."""

from __future__ import annotations

import pytest

from bench.gpu_check_tune import plan
from bench.gpu_verdict import verdict
from bench.wheelhouse import redundant


def test_plan_fills_the_time_target_with_measured_epochs() -> None:
    # 100 epochs took 80 s of a 160 s process: 0.8 s per epoch, 80 s besides; 300 s x 0.92 = 276 s -> 245 epochs
    n, why = plan(accuracy=99.61, wall=160, flow_total=130, retrain=80, epochs=100, target=300, left=400)
    assert n == 245 and "train.epochs=245" in why
    # the time left in the check, not the target, is what binds here: 200 x 0.92 = 184 s -> 130 epochs
    assert plan(99.61, 160, 130, 80, 100, 300, 200)[0] == 130


def test_plan_shortens_a_run_that_met_accuracy_but_not_time() -> None:
    n, _ = plan(accuracy=99.74, wall=400, flow_total=380, retrain=300, epochs=100, target=300, left=500)
    assert n == 58  # (276 - 100) / 3.0 = 58.7


@pytest.mark.parametrize(("accuracy", "wall", "left", "reason"), [
    (99.72, 250, 400, "met both targets"),
    (99.60, 270, 400, "only 106 epochs fit"),  # (276 - 170) / 1.0: too few more epochs to be worth a run
    (99.60, 250, 120, "no epochs fit"),
])
def test_plan_says_why_it_tries_nothing(accuracy: float, wall: float, left: float, reason: str) -> None:
    n, why = plan(accuracy, wall, flow_total=wall - 20, retrain=100, epochs=100, target=300, left=left)
    assert n is None and reason in why


TABLE = """\
set-up | 25s (wheels, MNIST, Prefect database)
strong | rc=0 | process wall 170.2s (limit 360s) | before flow 20.1s, after it 1.0s | Test accuracy (ONNX Runtime, \
CPUExecutionProvider): 99.66% | Wall time:       140.3 s (data 0.3, CV 20.0, retrain 90.0, export 9.0)
strong-tuned | train.epochs=190 (was 100; 99.66%, process 170 s, flow 140 s): ...
strong-tuned | rc=0 | process wall 262.0s (limit 300s) | before flow 20.0s, after it 1.0s | Test accuracy (ONNX \
Runtime, CPUExecutionProvider): 99.71% | Wall time:       231.0 s (data 0.3, CV 20.0, retrain 181.0)
seed-fresh | rc=0 | process wall 52.3s (limit 100s) | before flow 15.0s | Test accuracy (ONNX Runtime, \
CPUExecutionProvider): 91.40% | Wall time:       30.0 s (data 0.3, CV 9.0)
"""
BENCH = """\
| device | model | parameters | bare loop img/s | fit img/s | fit / bare |
|---|---|---|---|---|---|
| cuda | seed (dim 8, 3 blocks, MLP 32) (CUDA graph) | 2,650 | 21,535 | 77,535 | 3.60 |
| cuda | seed (dim 8, 3 blocks, MLP 32) (eager) | 2,650 | 21,535 | 18,000 | 0.84 |

| device | model | 1 fold s | 3 sequential s | 3 batched s | 3 batched / 1 fold | sequential / batched |
|---|---|---|---|---|---|---|
| cuda | seed (dim 8, 3 blocks, MLP 32) (CUDA graph) | 1.00 | 3.00 | 1.40 | 1.40 | 2.14 |
| cuda | seed (dim 8, 3 blocks, MLP 32) (eager) | 1.00 | 3.00 | 2.50 | 2.50 | 1.20 |
"""


def test_verdict_reads_each_check_from_the_rows_that_decide_it() -> None:
    lines = verdict(TABLE, BENCH)
    assert lines[0] == "seed study <= 60 s: met (52.3 s process wall)"
    assert lines[1].startswith("strong >= 99.70% in <= 5 min: missed by strong: 99.66%")
    assert "met by strong-tuned (train.epochs=190): 99.71%, flow 231.0 s" in lines[1]
    assert lines[2] == "3 batched folds <= 1.5x one fold: met (1.40x)"  # the eager row is not how the study trains
    assert lines[3].startswith("fit >= 0.9x bare loop: missed")  # every fit row counts, eager included
    assert verdict("", "") == [f"{check}: not measured" for check in (
        "seed study <= 60 s", "strong >= 99.70% in <= 5 min", "3 batched folds <= 1.5x one fold",
        "fit >= 0.9x bare loop")]


def test_batched_verdict_rests_on_the_folds_as_the_study_trains_them() -> None:
    """The 5-epoch folds table decides; the 1-epoch rows (fixed costs weigh 5x more there) are listed beside it."""
    folds = """\
## batched folds over 5 epochs, as the seed study's CV trains them (seed model)

| device | model | 1 fold s | 3 sequential s | 3 batched s | 3 batched / 1 fold | sequential / batched |
|---|---|---|---|---|---|---|
| cuda | seed (dim 8, 3 blocks, MLP 32) (CUDA graph) | 2.00 | 6.00 | 2.60 | 1.30 | 2.31 |
| cuda | seed (dim 8, 3 blocks, MLP 32) (eager) | 5.00 | 15.00 | 12.00 | 2.40 | 1.25 |
| cuda | seed (dim 8, 3 blocks, MLP 32) (CUDA graph, F.layer_norm) | 2.10 | 6.30 | 3.20 | 1.52 | 1.97 |
"""
    one_epoch = BENCH.replace("| 1.00 | 3.00 | 1.40 | 1.40 | 2.14 |", "| 0.30 | 0.90 | 0.51 | 1.70 | 1.76 |")
    line = verdict("", folds + "\n## fit vs bare loop, batched folds over 1 epoch (seed model)\n\n" + one_epoch)[2]
    assert line == ("3 batched folds <= 1.5x one fold: met (1.30x as the seed study's CV trains them; "
                    "1-epoch rows, not deciding: 1.70x; with F.layer_norm, not deciding: 1.52x)")
    missed = folds.replace("| 2.60 | 1.30 |", "| 3.20 | 1.60 |")
    assert verdict("", missed + BENCH)[2].startswith("3 batched folds <= 1.5x one fold: missed (1.60x")


def test_tune_reads_the_epochs_a_budgeted_run_trained(tmp_path, capsys) -> None:
    """Under a time budget the run trains fewer than train.epochs; the plan's seconds per epoch come from the count
    the summary reports (60 epochs in 180 s: 3.0 s each), not from the preset's maximum (200: 0.9 s each)."""
    from bench.gpu_check_tune import main

    log = tmp_path / "strong.log"
    log.write_text("Test accuracy (ONNX Runtime, CUDAExecutionProvider): 99.74%  [PyTorch: 99.74%]\n"
                   "Final training:  60 of train.epochs=200 epochs (time budget: flow 285 s, 35 s kept after the "
                   "training)\n"
                   "Wall time:       380.0 s (data 0.3, CV 60.0, retrain 180.0, export 9.0, evaluate 3.0)\n")
    assert main(["--log", str(log), "--wall", "400", "--target", "300", "--left", "500"]) == 0
    out = capsys.readouterr()
    # 300 s x 0.92 = 276 s, 400 - 180 = 220 s besides the retraining: (276 - 220) / 3.0 -> 18 (with 0.9 s: 62)
    assert out.out.strip() == "18" and "3.00 s per retraining epoch" in out.err


def _wheel(path, files: dict[str, bytes]):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return path


def test_wheelhouse_leaves_out_a_wheel_only_when_another_holds_every_file_byte_for_byte(tmp_path) -> None:
    """mlflow's wheel holds all of mlflow-skinny's files: skinny need not travel. A wheel with one file that differs
    in its bytes (or is missing from the bigger one) is kept; the .dist-info folders never count."""
    code = {"pkg/__init__.py": b"x = 1\n", "pkg/store.py": b"y = 2\n"}
    full = _wheel(tmp_path / "pkg-1.0-py3-none-any.whl",
                  {**code, "pkg/server/ui.js": b"ui", "pkg-1.0.dist-info/METADATA": b"Name: pkg"})
    skinny = _wheel(tmp_path / "pkg_skinny-1.0-py3-none-any.whl", {**code, "pkg_skinny-1.0.dist-info/METADATA": b"s"})
    patched = _wheel(tmp_path / "pkg_patched-1.0-py3-none-any.whl", {**code, "pkg/store.py": b"y = 3\n"})
    extra = _wheel(tmp_path / "pkg_extra-1.0-py3-none-any.whl", {**code, "pkg/extra.py": b"z"})
    other = _wheel(tmp_path / "other-1.0-py3-none-any.whl", {"other/__init__.py": b""})
    held = redundant([full, skinny, patched, extra, other])
    assert set(held) == {skinny} and held[skinny] in {full, extra}  # both hold skinny's two files
    twin = _wheel(tmp_path / "twin-1.0-py3-none-any.whl", dict(code))
    assert redundant([skinny, twin]) == {}  # same files, neither bigger: both stay
