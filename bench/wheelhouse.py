"""Wheels for bench/gpu_check.sh: the GPU machine has Python 3.12, torch and many packages, but no package registry.

    .venv/bin/python bench/wheelhouse.py              # -> .whl/ and .mnist/ (what `make wheelhouse` runs)
    .venv/bin/python bench/wheelhouse.py --complete   # every runtime dependency: for a bare Python 3.12 + torch

The requirements are pyproject.toml's runtime dependencies less torch and torchvision (preinstalled there, with
their nvidia-* libraries) and onnxruntime-gpu (a ~255 MB wheel; the machine has onnxruntime), plus pytest. pip
resolves them for CPython 3.12 on manylinux x86_64, binary wheels only (``pip install --dry-run --report``), then
downloads exactly the resolved versions (``pip download --no-deps``).

A device call carries at most 64 MiB: wheels, MNIST (.mnist/, ~9 MiB) and the checkout together, and the complete
set is over 250 MB. So unless ``--complete``, the folder holds what the GPU check needs and the GPU machine lacks:
left out are the distributions its image already has (GPU_IMAGE_HAS, pytest among them), the scale-out dependencies
(SCALE_OUT and what only they need; the GPU check runs the local runner on SQLite, and flows/ imports them only for
``--runner dask`` and PostgreSQL), NOT_IMPORTED, and any wheel whose every file another wheel of the set already
holds, byte for byte (``redundant``: mlflow's wheel holds all of mlflow-skinny and mlflow-tracing, ~6 MiB). That is
~48 MiB; the script prints what a device call would carry. Wheels already in the folder that are not in the resolved
set are removed: two wheels of one package stop ``pip install --no-deps``. bench/gpu_check.sh installs only the
wheels whose distribution the machine lacks, so an out-of-date GPU_IMAGE_HAS costs size, not correctness.
"""

from __future__ import annotations

import argparse
import json
import lzma
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
NOT_CARRIED = {"torch", "torchvision", "onnxruntime-gpu"}
EXTRA = ["pytest"]
SCALE_OUT = {"prefect-dask", "psycopg", "psycopg2-binary"}
NOT_IMPORTED = {"apprise"}  # Prefect's notification library: only notification blocks import it
# Distributions of the project's dependency closure that the GPU machine's image ('cuda') holds, from the device
# notes' package list (2026-11-17).
GPU_IMAGE_HAS = set("""
aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click cloudpickle colorama
contourpy cycler fonttools frozenlist fsspec h11 httpcore httpx humanize idna jinja2 joblib kiwisolver markdown
markdown-it-py markupsafe matplotlib mdurl ml-dtypes mpmath msgpack multidict narwhals numpy onnx onnx-ir onnxscript
packaging pandas pathspec pillow pluggy iniconfig prometheus-client propcache protobuf psutil pyarrow pygments
pyparsing pytest python-dateutil pyyaml regex requests rich scikit-learn scipy shellingham six sortedcontainers
sympy threadpoolctl toolz tqdm typer typing-extensions urllib3 werkzeug yarl zipp
filelock
""".split())  # filelock: a requirement of torch, which the image has
# Versions on that image as a session saw them (device notes, 2026-11): bench/gpu_rehearsal.sh mirrors them.
GPU_IMAGE_PINNED = {"torch": "2.11.0", "torchvision": "0.26.0", "numpy": "2.5.2", "onnx": "1.23.1",
                    "onnxruntime": "1.30.0", "onnxscript": "0.7.2", "onnx-ir": "1.0.0"}
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp"] + [
    arg for platform in ["manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    + [f"manylinux_2_{n}_x86_64" for n in (5, 12, 17, 24, 26, 27, 28, 31, 34, 35)]
    for arg in ("--platform", platform)]
CARRY_LIMIT_MIB = 64  # what one device call carries: the checkout and the carried folders together


def requirements(skip: set[str]) -> list[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if canonicalize_name(re.match(r"[A-Za-z0-9._-]+", d)[0]) not in skip] + EXTRA


def megabytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def carried_mib(dest: Path) -> float:
    """What a device call carrying ``dest`` and .mnist/ would send: those folders and the checkout's files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    checkout = [ROOT / name for name in listed if name]
    return megabytes(checkout) + megabytes(list(dest.glob("*"))) + megabytes(list((ROOT / ".mnist").glob("*")))


def resolve(reqs: list[str]) -> dict[str, str]:
    """{canonical name: version} of the whole dependency closure for the target interpreter and platform."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        *TARGET, "--report", str(report), *reqs], check=True)
        install = json.loads(report.read_text())["install"]
    return {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"] for item in install}


def redundant(wheels: list[Path]) -> dict[Path, Path]:
    """{wheel: the wheel that holds it}: each wheel whose files, its .dist-info aside, a larger wheel of the set has
    too, with the same bytes (same size and CRC-32), so installing both writes those files twice. A holder left out
    in turn has a larger holder of its own, so the files still come; the left-out distributions' metadata is all
    that goes missing."""

    def files(wheel: Path) -> dict[str, tuple[int, int]]:
        with zipfile.ZipFile(wheel) as archive:
            return {info.filename: (info.file_size, info.CRC) for info in archive.infolist()
                    if not info.is_dir() and ".dist-info/" not in info.filename}

    contents = {wheel: files(wheel) for wheel in sorted(wheels)}
    held: dict[Path, Path] = {}
    for wheel, own in contents.items():
        holder = next((other for other, theirs in contents.items()
                       if len(theirs) > len(own) and own.items() <= theirs.items()), None)
        if own and holder is not None:
            held[wheel] = holder
    return held


def pack_mnist(dest: Path) -> None:
    """The four raw MNIST files, verified, as ``dest/<name>.xz`` (kept when already there and complete)."""
    sys.path.insert(0, str(ROOT))
    from pipeline.config import DataConfig
    from pipeline.data import RAW_MD5, acquire, raw_dir

    root, _ = acquire(DataConfig())
    dest.mkdir(parents=True, exist_ok=True)
    for name in RAW_MD5:
        target = dest / f"{name}.xz"
        if target.is_file():
            continue
        partial = target.with_suffix(".xz.partial")  # never leave a truncated archive under the final name
        with lzma.open(partial, "wb", preset=9 | lzma.PRESET_EXTREME) as out:  # smallest: it travels
            out.write((raw_dir(root) / name).read_bytes())
        partial.replace(target)
    print(f"{dest}: MNIST from {root}, {megabytes(list(dest.glob('*.xz'))):.1f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--complete", action="store_true", help="also the distributions the GPU image has")
    parser.add_argument("--mnist", type=Path, default=ROOT / ".mnist", help="where the xz-packed MNIST files go")
    parser.add_argument("--image-requirements", action="store_true",
                        help="only print the GPU image's packages as requirements (for bench/gpu_rehearsal.sh)")
    args = parser.parse_args(argv)
    if args.image_requirements:
        print("\n".join(f"{name}=={GPU_IMAGE_PINNED[name]}" if name in GPU_IMAGE_PINNED else name
                        for name in sorted(GPU_IMAGE_HAS | set(GPU_IMAGE_PINNED))))
        return 0
    pack_mnist(args.mnist)

    if args.complete:
        closure = wanted = resolve(requirements(NOT_CARRIED))
    else:
        closure = resolve(requirements(NOT_CARRIED | SCALE_OUT))
        wanted = {name: version for name, version in closure.items() if name not in GPU_IMAGE_HAS | NOT_IMPORTED}
    args.dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dest.parent) as tmp:  # pip's cache makes a repeat download cheap
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *TARGET, "-d", tmp,
                        *(f"{name}=={version}" for name, version in sorted(wanted.items()))], check=True)
        fresh = {wheel.name: wheel for wheel in Path(tmp).glob("*.whl")}
        if not args.complete:
            for wheel, holder in redundant(list(fresh.values())).items():
                del fresh[wheel.name]
                print(f"left out {wheel.name}: {holder.name} holds every file of it")
        for wheel in args.dest.glob("*.whl"):  # one wheel per distribution: two stop `pip install --no-deps`
            if wheel.name not in fresh:
                wheel.unlink()
                print(f"removed {wheel.name} (no longer wanted)")
        for name, wheel in fresh.items():
            wheel.replace(args.dest / name)
    wheels = sorted(args.dest.glob("*.whl"))
    print(f"{args.dest}: {len(wheels)} wheels, {megabytes(wheels):.1f} MiB ({len(closure)} distributions resolved, "
          f"{len(closure) - len(wanted)} left to the GPU image)")
    if not args.complete:
        carried = carried_mib(args.dest)
        print(f"a device call carrying {args.dest.name}/ and .mnist/ sends {carried:.1f} MiB of at most "
              f"{CARRY_LIMIT_MIB}")
        if carried > CARRY_LIMIT_MIB:
            print("warning: that is over the limit; the GPU check cannot be carried", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
