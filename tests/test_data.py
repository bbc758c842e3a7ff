import functools
import gzip
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from pipeline.config import DataConfig
from pipeline.data import RAW_MD5, DataError, DownloadError, acquire, load, raw_dir, stratified_folds, stratified_subset


def test_real_mnist_in_memory(mnist):
    assert mnist.train_images.shape == (60000, 1, 28, 28) and mnist.train_images.dtype == torch.uint8
    assert mnist.test_images.shape == (10000, 1, 28, 28)
    assert mnist.train_labels.dtype == torch.int64 and set(mnist.train_labels.unique().tolist()) == set(range(10))


def test_acquire_verifies_md5(data_root):
    root, md5 = acquire(DataConfig(root=str(data_root), download=False))
    assert md5 == RAW_MD5


def test_subset_is_stratified(mnist):
    idx = stratified_subset(mnist.train_labels, 1000, seed=0)
    counts = torch.bincount(mnist.train_labels[idx], minlength=10).float()
    overall = torch.bincount(mnist.train_labels, minlength=10).float() / 60000 * 1000
    assert len(idx) == 1000 and len(idx.unique()) == 1000
    assert (counts - overall).abs().max() <= 1.0


def test_folds_are_stratified_disjoint_and_cover(mnist):
    labels = mnist.train_labels[:6000]
    folds = stratified_folds(labels, 3, seed=0)
    vals = [va for _, va in folds]
    assert sorted(torch.cat(vals).tolist()) == list(range(6000))
    for tr, va in folds:
        assert not set(tr.tolist()) & set(va.tolist())
        assert len(tr) + len(va) == 6000
        share = torch.bincount(labels[va], minlength=10).float() / len(va)
        assert (share - torch.bincount(labels, minlength=10).float() / 6000).abs().max() < 0.005
    assert stratified_folds(labels, 3, seed=0)[0][1].tolist() == folds[0][1].tolist()  # seed reproduces


def test_missing_data_without_download_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("VITFLOW_DATA_DIR")
    with pytest.raises(DataError) as info:
        acquire(DataConfig(root=str(tmp_path), download=False))
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "VITFLOW_DATA_DIR" in message
    assert "train-images-idx3-ubyte" in message


class _Mirror:
    """A local HTTP mirror on 127.0.0.1 serving gzipped MNIST files, like the public mirrors do."""

    def __init__(self, directory: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mnist/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass  # clients closing early (broken pipe) are not the test's concern


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _mirror_dir(tmp_path: Path, data_root: Path, corrupt: str | None = None) -> Path:
    served = tmp_path / "served" / "mnist"
    served.mkdir(parents=True)
    for name in RAW_MD5:
        payload = (raw_dir(data_root) / name).read_bytes()
        if name == corrupt:
            payload = payload[:-100]  # truncated
        (served / f"{name}.gz").write_bytes(gzip.compress(payload, compresslevel=1))
    return tmp_path / "served"


def test_download_from_local_mirror(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("VITFLOW_DATA_DIR")
    target = tmp_path / "data"
    with _Mirror(_mirror_dir(tmp_path, data_root)) as mirror:
        root, md5 = acquire(DataConfig(root=str(target), mirrors=[mirror.url]))
    assert root == target.resolve() and md5 == RAW_MD5
    assert sorted(p.name for p in raw_dir(target).iterdir()) == sorted(RAW_MD5)  # archives removed
    data = load(DataConfig(root=str(target), download=False, train_subset=100))
    assert len(data.train_labels) == 100


def test_corrupt_download_is_caught_and_named(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("VITFLOW_DATA_DIR")
    with _Mirror(_mirror_dir(tmp_path, data_root, corrupt="t10k-labels-idx1-ubyte")) as mirror:
        with pytest.raises(DownloadError, match="t10k-labels-idx1-ubyte has md5 .*, expected 27ae3e4e"):
            acquire(DataConfig(root=str(tmp_path / "data"), mirrors=[mirror.url]))
    assert not (raw_dir(tmp_path / "data") / "t10k-labels-idx1-ubyte").exists()  # a retry fetches it again


def test_corrupt_local_file_is_named_before_training(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("VITFLOW_DATA_DIR")
    raw = raw_dir(tmp_path)
    raw.mkdir(parents=True)
    for name in RAW_MD5:
        (raw / name).write_bytes((raw_dir(data_root) / name).read_bytes())
    with open(raw / "train-labels-idx1-ubyte", "r+b") as f:
        f.seek(500)
        f.write(b"\x09")
    with pytest.raises(DataError, match="MNIST file corrupt: .*train-labels-idx1-ubyte has md5"):
        acquire(DataConfig(root=str(tmp_path), download=False))


def test_unreachable_mirror_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("VITFLOW_DATA_DIR")
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as info:
        acquire(DataConfig(root=str(tmp_path / "data"), mirrors=[f"http://127.0.0.1:{port}/"]))
    assert "could not download MNIST" in str(info.value) and "MNIST/raw" in str(info.value)
    # which mirror was tried and what it answered, not only "Error downloading <file>:"
    assert f"Tried http://127.0.0.1:{port}/, got:" in str(info.value) and "refused" in str(info.value)
    assert not list(raw_dir(tmp_path / "data").glob("*.gz"))
