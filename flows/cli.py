"""``vitflow``: the command line. ``vitflow run`` validates the configuration, runs the Prefect flow and prints
a summary table."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.config import ConfigError, list_presets, load_config  # noqa: E402
from pipeline.data import DataError  # noqa: E402


def _sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")  # runs end KILLED, not left RUNNING


def format_summary(s: dict[str, Any]) -> str:
    rows = [("rank", "configuration", "params", "val error", "train error")]
    for r in s["leaderboard"]:
        rows.append((str(r["rank"]), r["label"] + ("  <- selected" if r["rank"] == 1 else ""),
                     f"{r['parameters']:,}", f"{100 * r['val_error_mean']:.2f}% ± {100 * r['val_error_std']:.2f}",
                     f"{100 * r['train_error_mean']:.2f}% ± {100 * r['train_error_std']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    reg = s["registration"]
    t = s["timings"]
    ui = ("make ui   (then open http://127.0.0.1:5000)" if s["tracking_uri"].startswith("sqlite")
          else s["tracking_uri"])
    return "\n".join([
        "",
        f"Study '{s['study']}' ({len(s['leaderboard'])} configurations x "
        f"{len(s['leaderboard'][0]['fold_val_errors'])}-fold CV, device {s['device']})",
        "",
        table,
        "",
        f"Test accuracy (ONNX Runtime, {s['provider']}): {100 * s['test_accuracy']:.2f}%  "
        f"[PyTorch: {100 * (1 - s['final_history'][-1]['test_error']):.2f}%, parity max |diff| "
        f"{s['parity_max_abs_diff']:.1e}]",
        f"ONNX model:      {s['onnx_path']}",
        f"Registered:      {reg['model_uri']} -> @{reg['alias']} ({reg['reason']})",
        f"Wall time:       {t['total_s']:.1f} s (data {t['data_s']:.1f}, CV {t['cv_s']:.1f}, retrain "
        f"{t['retrain_s']:.1f}, export {t['export_s']:.1f}, evaluate {t['evaluate_s']:.1f}, register "
        f"{t['register_s']:.1f})",
        f"MLflow:          experiment '{s['experiment']}', study run {s['study_run_id']}",
        f"Look at it:      {ui}",
    ])


def cmd_run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.set)  # validate before Prefect or any data work starts
    except ConfigError as exc:
        print(f"vitflow: {exc}", file=sys.stderr)
        return 2
    from flows.vit_pipeline import vit_pipeline

    signal.signal(signal.SIGTERM, _sigterm)
    try:
        summary = vit_pipeline(config=args.config, overrides=args.set)
    except (DataError, ConfigError) as exc:
        print(f"vitflow: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vitflow: interrupted; open MLflow runs were marked KILLED", file=sys.stderr)
        return 130
    except Exception as exc:  # the flow's log above has the traceback; end with the cause in one line
        print(f"vitflow: study failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vitflow", description="ViT on MNIST: k-fold model selection as a "
                                     "Prefect flow, tracked in MLflow, exported to ONNX.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a study (cross-validation, retraining, ONNX export, registration)")
    run.add_argument("--config", "-c", default="seed",
                     help=f"preset name ({', '.join(list_presets())}) or path to a YAML file (default: seed)")
    run.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.epochs=2 --set cv.grid.model.depth=[2,3]")
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
