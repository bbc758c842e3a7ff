"""How many epochs the strong preset can train in its time target, from a finished run of it (bench/gpu_check.sh's
``strong-tuned`` stage).

    python bench/gpu_check_tune.py --log strong.log --wall 142.0 --target 300 --left 260 [--set KEY=VALUE ...]

Reads the run's summary from its log (ONNX Runtime test accuracy; ``Wall time``: the flow's total and the
retraining's seconds) and its process wall time, and prints the number of retraining epochs that the same study
would fit into ``min(target, left)`` seconds, less 8% margin: the retraining's seconds per epoch are measured,
everything else (process start, CV, export, evaluation) is taken as it was. Exits 1, with the reason on stderr and
nothing on stdout, when there is nothing to try: the run met both targets, or no useful number of epochs fits.
On stderr it always writes one line for the check's table.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gpu_verdict import ACCURACY, ACCURACY_TARGET, TIME_TARGET_S  # noqa: E402
from pipeline.config import load_config  # noqa: E402

MARGIN = 0.92


def plan(accuracy: float, wall: float, flow_total: float, retrain: float, epochs: int, target: float,
         left: float) -> tuple[int | None, str]:
    """(epochs to try or None, why). ``wall`` is the process's seconds, ``flow_total`` and ``retrain`` the summary's;
    the time target is met by the flow's total (what its MLflow run records, as bench/gpu_verdict.py reads it); the
    epochs are planned on ``wall``, the stricter of the two."""
    if accuracy >= ACCURACY_TARGET and flow_total <= target:
        return None, f"strong met both targets ({accuracy:.2f}%, flow {flow_total:.0f} s): nothing to tune"
    per_epoch, fixed = retrain / epochs, wall - retrain
    budget = min(target, left) * MARGIN
    n = math.floor((budget - fixed) / per_epoch) if budget > fixed else 0
    n = min(n, 4 * epochs)
    detail = (f"{per_epoch:.2f} s per retraining epoch, {fixed:.0f} s besides; {budget:.0f} s to fill "
              f"(min(target {target:.0f}, left {left:.0f}) x {MARGIN})")
    if n < 1:
        return None, f"no epochs fit: {detail}"
    if accuracy < ACCURACY_TARGET and n < math.ceil(1.15 * epochs):
        return None, f"{accuracy:.2f}% < {ACCURACY_TARGET}%, but only {n} epochs fit (now {epochs}): {detail}"
    return n, (f"train.epochs={n} (was {epochs}; {accuracy:.2f}%, process {wall:.0f} s, flow {flow_total:.0f} s): "
               f"{detail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", type=Path, required=True, help="the strong study's output (vitflow run)")
    parser.add_argument("--wall", type=float, required=True, help="its process wall time, seconds")
    parser.add_argument("--target", type=float, default=TIME_TARGET_S,
                        help=f"time target, seconds (default {TIME_TARGET_S:.0f})")
    parser.add_argument("--left", type=float, required=True, help="seconds left in the check's budget")
    parser.add_argument("--config", default="strong")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as passed to vitflow run")
    args = parser.parse_args(argv)

    text = args.log.read_text(errors="replace")
    accuracy = ACCURACY.findall(text)
    timing = re.findall(r"Wall time: +([0-9.]+) s \(.*?retrain ([0-9.]+)", text)
    if not accuracy or not timing:
        print(f"strong-tuned | skipped: no summary in {args.log.name}", file=sys.stderr)
        return 1
    trained = re.findall(r"Final training: +(\d+)", text)  # under a time budget, fewer than train.epochs
    epochs = int(trained[-1]) if trained else load_config(args.config, args.set).train.epochs
    n, why = plan(float(accuracy[-1]), args.wall, float(timing[-1][0]), float(timing[-1][1]), epochs, args.target,
                  args.left)
    print(f"strong-tuned | {'skipped: ' if n is None else ''}{why}", file=sys.stderr)
    if n is None:
        return 1
    print(n)
    return 0


if __name__ == "__main__":
    sys.exit(main())
