"""MNIST through torchvision, held in memory as uint8 tensors; stratified subsets and folds from scikit-learn."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch import Tensor
from torchvision.datasets import MNIST as _TorchvisionMNIST
from torchvision.datasets.utils import calculate_md5

from pipeline.config import DATA_DIR_ENV, DataConfig

# MD5 of the four uncompressed files (torchvision's layout: <root>/MNIST/raw/<name>). Checking the content
# rather than the .gz archive lets any faithful mirror serve them, whatever its gzip settings.
RAW_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
TEST_IMAGES = 10_000


class DataError(RuntimeError):
    """MNIST is missing, unreachable or corrupt; the message says which file and what to do."""


class DownloadError(DataError):
    """The download itself failed (network, mirror); worth retrying, unlike a missing or corrupt file."""


class MNIST(_TorchvisionMNIST):
    """torchvision's MNIST with configurable mirrors; archive checksums are replaced by RAW_MD5 on the content."""

    resources = [(f"{name}.gz", None) for name in RAW_MD5]

    def __init__(self, *args, mirrors: list[str] | None = None, **kwargs) -> None:
        if mirrors:
            self.mirrors = [m if m.endswith("/") else m + "/" for m in mirrors]
        super().__init__(*args, **kwargs)


@dataclass
class MnistTensors:
    """The data set in memory: images uint8 (N, 1, 28, 28), labels int64 (N,)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    root: Path
    md5: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        return f"{len(self.train_labels)} training / {len(self.test_labels)} test images from {self.root}"


def raw_dir(root: Path) -> Path:
    return Path(root) / "MNIST" / "raw"


def _where_to_put(root: Path) -> str:
    return (f"put the four files ({', '.join(RAW_MD5)}) in {raw_dir(root)}, or point ${DATA_DIR_ENV} at a folder "
            f"that holds MNIST/raw/")


def verify(root: Path, fix: str = "delete it and run again with data.download enabled, or replace it with an "
                                  "intact copy") -> dict[str, str]:
    """MD5 of each raw file, checked against the published values; DataError names the first bad file."""
    digests = {}
    for name, expected in RAW_MD5.items():
        path = raw_dir(root) / name
        if not path.is_file():
            raise DataError(f"MNIST file missing: {path}; {_where_to_put(root)}")
        digest = calculate_md5(str(path))
        if digest != expected:
            raise DataError(f"MNIST file corrupt: {path} has md5 {digest}, expected {expected}; {fix}")
        digests[name] = digest
    return digests


def acquire(cfg: DataConfig) -> tuple[Path, dict[str, str]]:
    """Make sure the four MNIST files are present and intact under the data root; download missing ones."""
    root = cfg.resolved_root()
    missing = [name for name in RAW_MD5 if not (raw_dir(root) / name).is_file()]
    if missing:
        if not cfg.download:
            raise DataError(f"MNIST not found ({', '.join(missing)} missing) and data.download is off; "
                            f"{_where_to_put(root)}")
        try:
            for train in (True, False):
                MNIST(str(root), train=train, download=True, mirrors=cfg.mirrors)
            failure = None
        except Exception as exc:  # network, permissions, disk, or a file too damaged to parse
            failure = exc
        for archive in raw_dir(root).glob("*.gz"):
            archive.unlink()  # never leave a truncated archive for the next attempt to trust
        try:
            if failure is None or all((raw_dir(root) / name).is_file() for name in RAW_MD5):
                return root, verify(root, fix="the download was damaged and has been removed; run again, or set "
                                              "data.mirrors to another mirror")
        except DataError as exc:
            for name in missing:  # what this attempt fetched is bad: remove it so a retry fetches it again
                (raw_dir(root) / name).unlink(missing_ok=True)
            raise DownloadError(str(exc)) from failure
        root_cause = failure.__cause__ or failure.__context__
        # torchvision's message spans lines (the file, then each mirror tried and its error): keep all of it.
        reason = "; ".join(" ".join(str(e).split())[:600] or type(e).__name__
                           for e in (failure, root_cause) if e is not None)
        raise DownloadError(f"could not download MNIST into {raw_dir(root)} ({reason}); without network, "
                            f"{_where_to_put(root)}") from failure
    return root, verify(root)


_PROCESS_DATA: dict[tuple, MnistTensors] = {}
_PROCESS_DATA_LOCK = threading.Lock()


def load_elsewhere(cfg: DataConfig, root: Path, md5: dict[str, str]) -> MnistTensors:
    """The data set in a process that did not acquire it (a Dask worker, maybe on another machine): from this
    machine's $VITFLOW_DATA_DIR if set, else from the flow's data root ``root`` (a shared filesystem). Missing
    files are downloaded there under a file lock, so that workers sharing a disk fetch them once; every file's
    MD5 must equal the flow's (``md5``). Cached per process: one load per worker and study, not one per fold."""
    local = Path(os.environ.get(DATA_DIR_ENV) or root).expanduser().resolve()
    key = (str(local), tuple(sorted(md5.items())), cfg.train_subset, cfg.test_subset, cfg.subset_seed)
    with _PROCESS_DATA_LOCK:
        if key in _PROCESS_DATA:
            return _PROCESS_DATA[key]
        if all((raw_dir(local) / name).is_file() for name in RAW_MD5):
            digests = verify(local)  # read-only: a shared data root is never written to when it is complete
        else:
            from filelock import FileLock

            raw_dir(local).mkdir(parents=True, exist_ok=True)
            with FileLock(str(raw_dir(local) / ".vitflow-acquire.lock")):
                _, digests = acquire(cfg.model_copy(update={"root": str(local)}))
        for name, expected in md5.items():
            if digests.get(name) != expected:
                raise DataError(f"MNIST file {raw_dir(local) / name} on {socket.gethostname()} has md5 "
                                f"{digests.get(name)}, the study's is {expected}; give every worker the same files "
                                f"(a shared data root, or ${DATA_DIR_ENV} on each machine)")
        tensors = load(cfg, root=local, md5=digests)
        _PROCESS_DATA.clear()  # one study's data per worker process at a time
        _PROCESS_DATA[key] = tensors
        return tensors


def test_set_id(test_subset: int | None, subset_seed: Any, test_images_md5: str | None) -> str:
    """Which test images an accuracy was measured on, as a comparable string: two accuracies are comparable only
    when theirs are equal (the champion/challenger decision). ``test_subset`` None (or 10,000 or more) is the
    whole test set, whatever the subset seed."""
    md5 = (test_images_md5 or "unknown")[:12]
    if test_subset is None or int(test_subset) >= TEST_IMAGES:
        return f"MNIST test set {md5}: all {TEST_IMAGES:,}"
    return f"MNIST test set {md5}: {int(test_subset)} images, subset_seed {subset_seed}"


def stratified_subset(labels: Tensor, size: int | None, seed: int) -> Tensor:
    """Indices of a class-balanced subset of ``size`` items (all indices when size is None or too large)."""
    n = len(labels)
    if size is None or size >= n:
        return torch.arange(n)
    idx, _ = train_test_split(np.arange(n), train_size=size, stratify=labels.numpy(), random_state=seed)
    return torch.from_numpy(np.sort(idx))


def load(cfg: DataConfig, root: Path | None = None, md5: dict[str, str] | None = None) -> MnistTensors:
    """The data set as in-memory tensors (acquiring it first unless ``root`` is given)."""
    if root is None:
        root, md5 = acquire(cfg)
    sets = {}
    for split, train in (("train", True), ("test", False)):
        ds = MNIST(str(root), train=train, download=False)
        sets[split] = (ds.data.unsqueeze(1).contiguous(), ds.targets.long())
    train_idx = stratified_subset(sets["train"][1], cfg.train_subset, cfg.subset_seed)
    test_idx = stratified_subset(sets["test"][1], cfg.test_subset, cfg.subset_seed)
    return MnistTensors(
        train_images=sets["train"][0][train_idx], train_labels=sets["train"][1][train_idx],
        test_images=sets["test"][0][test_idx], test_labels=sets["test"][1][test_idx],
        root=Path(root), md5=dict(md5 or {}),
    )


def stratified_folds(labels: Tensor, folds: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """(train_indices, validation_indices) per fold, from scikit-learn's shuffled StratifiedKFold."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    y = labels.numpy()
    return [(torch.from_numpy(tr), torch.from_numpy(va)) for tr, va in splitter.split(np.zeros(len(y)), y)]

