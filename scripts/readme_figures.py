"""Regenerate the README's figures (docs/*.png) from a real run of the project's own pipeline.

By default runs the seed study (``vitflow run --config seed``: about 2 minutes on one GPU, much longer on a few CPU
cores) into a throw-away MLflow store, then takes the figures its final run logged and writes them to docs/,
re-encoded as palette PNGs so each stays under --max-kb. Arguments after ``--`` replace the run's arguments. With
--tracking-uri it skips the run and uses the latest finished final run in that store (of --experiment if given).

    .venv/bin/python scripts/readme_figures.py            # or: make figures
    .venv/bin/python scripts/readme_figures.py -- --config smoke --set data.train_subset=6000 --set train.epochs=3
    .venv/bin/python scripts/readme_figures.py --tracking-uri sqlite:////tmp/fig/mlflow.db --experiment vitflow-seed
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RUN = ["--config", "seed"]
DEFAULT_FIGURES = ["model_selection", "attention"]


def run_study(tracking_uri: str, args: list[str]) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PREFECT_SERVER_ANALYTICS_ENABLED="false")
    print("running: vitflow run", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=REPO, env=env, check=True)


def latest_final_run(tracking_uri: str, experiment: str | None) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            sys.exit(f"readme_figures: no experiment {experiment!r} in {tracking_uri}")
        ids = [exp.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "tags.`vitflow.role` = 'final' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        sys.exit(f"readme_figures: no finished final run in {experiment or tracking_uri!r}")
    return runs[0].info.run_id


def compact_png(source: Path, target: Path, max_kb: int) -> int:
    """Palette PNG (256 colours, optimised), scaled down in 10% steps until it fits ``max_kb``; returns bytes."""
    with Image.open(source) as original:
        image = original.convert("RGB")
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        resized = image if scale == 1.0 else image.resize(size, Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        resized.quantize(colors=256).save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_kb * 1024 or scale < 0.35:
            break
        scale *= 0.9
    target.write_bytes(buffer.getvalue())
    return buffer.tell()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", help="use this MLflow store as it is (no new run)")
    parser.add_argument("--experiment", help="default: any experiment in the store")
    parser.add_argument("--out", default=str(REPO / "docs"))
    parser.add_argument("--figures", nargs="+", default=DEFAULT_FIGURES, help="names under figures/ on the final run")
    parser.add_argument("--max-kb", type=int, default=150)
    parser.add_argument("run_args", nargs="*", default=DEFAULT_RUN,
                        help=f"arguments of vitflow run (after --); default: {' '.join(DEFAULT_RUN)}")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="vitflow-figures-") as scratch:
        uri = args.tracking_uri
        if not uri:
            uri = f"sqlite:///{Path(scratch) / 'mlflow.db'}"
            run_study(uri, args.run_args)
        run_id = latest_final_run(uri, args.experiment)
        from mlflow.tracking import MlflowClient

        local = Path(MlflowClient(tracking_uri=uri).download_artifacts(run_id, "figures", scratch))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.figures:
            size = compact_png(local / f"{name}.png", out / f"{name}.png", args.max_kb)
            print(f"{out / f'{name}.png'}: {size / 1024:.0f} KB (from final run {run_id})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
