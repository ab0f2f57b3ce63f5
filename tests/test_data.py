"""Tests for lowbit.data: IDX reading, search order, checksums and downloads (synthetic files, local server)."""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lowbit import data

REAL_DATA_DIR = os.environ.get("LOWBIT_DATA_DIR")  # read before the autouse fixture clears it
SYSTEM_DIRS = dict(data._SYSTEM_DIRS)
COUNTS = {"train": 6, "test": 4}


def idx_bytes(arr: np.ndarray) -> bytes:
    return struct.pack(f">I{arr.ndim}I", 0x0800 | arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


def write(folder: Path, files: dict[str, bytes], gz: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for base, raw in files.items():
        (folder / (base + ".gz" if gz else base)).write_bytes(gzip.compress(raw) if gz else raw)
    return folder


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real data folders, an empty cache, and a mirror that refuses connections."""
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LOWBIT_MIRROR", closed_port_url())
    monkeypatch.setattr(data, "_SYSTEM_DIRS", {})


@pytest.fixture
def synth(monkeypatch):
    """Four small synthetic MNIST files (raw bytes by base name), registered as the expected checksums."""
    rng = np.random.default_rng(0)
    files = {}
    for split, (img, lab) in data.SPLITS.items():
        n = COUNTS[split]
        files[img] = idx_bytes(rng.integers(0, 256, (n, 28, 28)))
        files[lab] = idx_bytes(rng.integers(0, 10, n))
    monkeypatch.setattr(data, "_COUNTS", COUNTS)
    monkeypatch.setitem(data._MD5, "mnist", {b: hashlib.md5(raw).hexdigest() for b, raw in files.items()})
    return files


@pytest.fixture
def server(monkeypatch):
    """A local HTTP mirror in a thread: serves `routes`, sends half of the files named in `truncate`."""
    state = SimpleNamespace(routes={}, truncate=set(), hits=[])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.lstrip("/")
            state.hits.append(name)
            body = state.routes.get(name)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if name in state.truncate else body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("LOWBIT_MIRROR", f"http://127.0.0.1:{httpd.server_port}")
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    path = write(tmp_path, {"x": idx_bytes(arr)}, gz=gz) / ("x.gz" if gz else "x")
    out = data.read_idx(path, data.IMAGES_MAGIC)
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8 and np.array_equal(out, arr)


def test_read_idx_bad_magic(tmp_path):
    (tmp_path / "bad").write_bytes(b"<html>not found</html>")
    with pytest.raises(data.DataError, match=r"bad: not an IDX.*magic number"):
        data.read_idx(tmp_path / "bad")
    write(tmp_path, {"labels": idx_bytes(np.zeros(3))}, gz=False)
    with pytest.raises(data.DataError, match="expected 2051"):
        data.read_idx(tmp_path / "labels", data.IMAGES_MAGIC)


def test_read_idx_truncated(tmp_path):
    raw = idx_bytes(np.zeros((3, 28, 28)))
    (tmp_path / "short").write_bytes(raw[:-10])
    with pytest.raises(data.DataError, match=r"short: truncated.*delete it"):
        data.read_idx(tmp_path / "short")
    (tmp_path / "short.gz").write_bytes(gzip.compress(raw)[:-20])
    with pytest.raises(data.DataError, match=r"short.gz: truncated gzip.*delete it"):
        data.read_idx(tmp_path / "short.gz")


def test_unknown_dataset_and_split():
    with pytest.raises(data.DataError, match="known datasets: mnist, fashion-mnist"):
        data.load_dataset("cifar10")
    with pytest.raises(data.DataError, match="known splits: train, test"):
        data.load_dataset("mnist", "val")


def test_load_from_dir_and_search_order(tmp_path, monkeypatch, synth):
    flat = write(tmp_path / "flat", synth, gz=False)  # files directly in the folder, raw
    ds = data.load_dataset("mnist", "test", flat)
    assert ds.images.shape == (4, 1, 28, 28) and ds.images.dtype == torch.float32 and len(ds) == 4
    assert ds.labels.dtype == torch.int64 and 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    expect = np.frombuffer(synth["t10k-images-idx3-ubyte"], np.uint8, offset=16).reshape(4, 1, 28, 28) / 255
    assert torch.allclose(ds.images, torch.from_numpy(expect).float())
    # <dir>/<dataset>/ layout via $LOWBIT_DATA_DIR; the explicit data_dir wins over it
    write(tmp_path / "env" / "mnist", synth)
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path / "env"))
    assert data.find_files("mnist", flat)["train-images-idx3-ubyte"] == flat / "train-images-idx3-ubyte"
    assert data.find_files("mnist")["train-images-idx3-ubyte"].parent == tmp_path / "env" / "mnist"
    assert len(data.load_dataset("mnist", "train")) == 6


def test_count_mismatch(tmp_path, synth):
    files = dict(synth, **{"train-labels-idx1-ubyte": idx_bytes(np.zeros(5))})
    with pytest.raises(data.DataError, match=r"train-labels-idx1-ubyte.gz: shape \(5,\), expected 6"):
        data.load_dataset("mnist", "train", write(tmp_path, files), download=False)


def test_checksum_mismatch_is_reported(tmp_path, synth):
    files = dict(synth, **{"train-labels-idx1-ubyte": idx_bytes(np.ones(6))})
    with pytest.raises(data.DataError, match=r"Rejected: .*train-labels-idx1-ubyte.gz: decompressed MD5"):
        data.load_dataset("mnist", "train", write(tmp_path, files), download=False)


def test_an_intact_file_of_another_data_set_is_named_not_called_damaged(tmp_path, synth, monkeypatch):
    # (MNIST's files met while looking for Fashion-MNIST were "damaged ... delete it")
    monkeypatch.setattr(data, "_SYSTEM_DIRS", {k: [] for k in data._SYSTEM_DIRS})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = write(tmp_path / "mnist", synth)
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte.gz is mnist's t10k-labels-idx1-ubyte "
                                             r"\(intact\), not fashion-mnist's\. Fix: point lowbit at a folder "
                                             r"holding fashion-mnist .*keep this file"):
        data.load_dataset("fashion-mnist", "test", folder, download=False, progress=False)


def test_missing_files_offline(tmp_path):
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion-mnist", "train", tmp_path / "nowhere", progress=False)
    msg = str(err.value)
    cache = str(tmp_path / "cache" / "lowbit" / "fashion-mnist")
    for needed in (*data.SPLITS["train"], str(tmp_path / "nowhere"),
                   "download failed", "--data-dir", "LOWBIT_DATA_DIR", "apt-get install dataset-fashion-mnist"):
        assert needed in msg
    # a folder named explicitly is the only one searched (a wrong one fell back to the others)
    assert cache not in msg
    assert not (tmp_path / "nowhere").exists()  # no empty folders left behind
    with pytest.raises(data.DataError) as err:
        data.load_dataset("fashion-mnist", "train", progress=False)
    assert cache in str(err.value)  # (without one: the cache, and the others)


def test_an_explicit_data_dir_is_not_replaced_by_lowbit_data_dir(tmp_path, synth, monkeypatch):
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(write(tmp_path / "env", synth)))
    assert len(data.load_dataset("mnist", "train", download=False).images) > 0  # (the variable: found there)
    with pytest.raises(data.DataError, match="Searched: " + str(tmp_path / "empty")) as err:
        data.load_dataset("mnist", "train", tmp_path / "empty", download=False)
    assert "LOWBIT_DATA_DIR and the cache are not searched" in str(err.value)


def test_missing_file_is_named_and_a_file_is_not_a_data_folder(tmp_path, synth):
    folder = write(tmp_path / "partial", {"train-images-idx3-ubyte": synth["train-images-idx3-ubyte"]})
    with pytest.raises(data.DataError, match=r"partial has train-images-idx3-ubyte but not train-labels-idx1-ubyte"):
        data.load_dataset("mnist", "train", folder, download=False)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(data.DataError, match="afile is a file, not a folder"):
        data.load_dataset("mnist", "train", tmp_path / "afile")


def test_a_download_killed_hard_leaves_no_part_file_for_good(tmp_path, synth, server):
    server.routes.update({f"{b}.gz": gzip.compress(raw) for b, raw in synth.items()})
    target = tmp_path / "mnist"
    target.mkdir()
    stale, fresh = target / ".train-images-idx3-ubyte.gz.abc.part", target / ".train-labels-idx1-ubyte.gz.def.part"
    stale.write_bytes(b"half"), fresh.write_bytes(b"in progress elsewhere")
    old = time.time() - 2 * data._STALE_PART_S
    os.utime(stale, (old, old))
    data.load_dataset("mnist", "train", target, progress=False)
    assert not stale.exists() and fresh.exists()  # a recent one may be another process's download


def test_download_success_cached(tmp_path, synth, server, capsys):
    server.routes.update({f"{b}.gz": gzip.compress(raw) for b, raw in synth.items()})
    ds = data.load_dataset("mnist", "train", progress=True)
    assert len(ds) == 6 and sorted(server.hits) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    cache = tmp_path / "cache" / "lowbit" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    assert capsys.readouterr().out == ""
    again = data.load_dataset("mnist", "train")  # from the cache, no request
    assert len(server.hits) == 2 and torch.equal(again.images, ds.images)
    # an explicit data_dir receives the download in its <dir>/<dataset>/ subfolder
    assert len(data.load_dataset("mnist", "test", tmp_path / "d", progress=False)) == 4
    assert (tmp_path / "d" / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()


@pytest.mark.parametrize("fault,message", [
    ("truncated", "truncated"), ("checksum", "wrong checksum"),
    # a captive portal's page: the error names the download, not a temp file it already deleted
    ("html", "the downloaded train-images-idx3-ubyte.gz: not an IDX image file .* \\(deleted, nothing kept\\)"),
])
def test_download_fault_leaves_nothing(tmp_path, synth, server, fault, message):
    server.routes.update({f"{b}.gz": gzip.compress(raw) for b, raw in synth.items()})
    if fault == "truncated":
        server.truncate.add("train-images-idx3-ubyte.gz")
    elif fault == "checksum":
        server.routes["train-images-idx3-ubyte.gz"] = gzip.compress(synth["t10k-images-idx3-ubyte"])
    else:
        server.routes["train-images-idx3-ubyte.gz"] = b"<html>sign in to the wifi</html>"
    target = tmp_path / "mnist"
    with pytest.raises(data.DataError, match=message) as err:
        data.load_dataset("mnist", "train", target, progress=False)
    assert ".part" not in str(err.value)
    left = [p.name for p in target.iterdir()] if target.exists() else []
    assert not [n for n in left if n.startswith("train-images") or n.endswith(".part")], left


@pytest.mark.slow
def test_real_mnist():
    if not REAL_DATA_DIR:
        pytest.skip("LOWBIT_DATA_DIR is not set (CI sets it to /work/shared/data/mnist)")
    train = data.load_dataset("mnist", "train", REAL_DATA_DIR, download=False)
    test = data.load_dataset("mnist", "test", REAL_DATA_DIR, download=False)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.min() == 0.0 and train.images.max() == 1.0
    assert train.labels.bincount().tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert test.labels.bincount().tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with pytest.raises(data.DataError, match="decompressed MD5"):  # MD5s are really checked
        data._verify("mnist", "train-images-idx3-ubyte", b"x", Path("x"))


@pytest.mark.slow
def test_real_fashion_mnist_from_debian(monkeypatch):
    folder = SYSTEM_DIRS["fashion-mnist"][0]
    if not data._files_in(folder, data.FILES):
        pytest.skip(f"Fashion-MNIST not installed in {folder} (apt-get install dataset-fashion-mnist)")
    monkeypatch.setattr(data, "_SYSTEM_DIRS", SYSTEM_DIRS)
    train = data.load_dataset("fashion-mnist", "train", download=False)
    test = data.load_dataset("fashion-mnist", "test", download=False)
    assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10
    assert train.images.shape == (60000, 1, 28, 28) and float(train.images.max()) == 1.0
