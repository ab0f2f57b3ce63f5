"""MNIST and Fashion-MNIST as in-memory tensors, read from the standard IDX files.

Files (``train-images-idx3-ubyte`` etc., gzipped or raw) are looked up in the ``data_dir``
argument (CLI ``--data-dir``) alone when it is given — a folder named explicitly is not silently
replaced by another (before 0.3.8 a wrong one fell back to the places below) — else in this order:

1. ``$LOWBIT_DATA_DIR``,
2. the per-user cache ``$XDG_CACHE_HOME/lowbit/<dataset>`` (default ``~/.cache/lowbit/<dataset>``),
3. for Fashion-MNIST, the Debian package folder ``/usr/share/datasets/fashion-mnist``.

Each folder may hold the files directly or in a ``<folder>/<dataset>/`` subfolder. Missing files
are downloaded (``$LOWBIT_MIRROR`` overrides the mirror) into the explicit ``data_dir`` or the
cache. The *decompressed* content of every file is checked against a known MD5, so a gzip that
differs only in its header (Debian's Fashion-MNIST files) is accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import struct
import tempfile
import time
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

__all__ = ["DATASETS", "DataError", "ChecksumError", "Dataset", "load_dataset", "read_idx", "find_files"]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
SPLITS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILES: tuple[str, ...] = tuple(f for pair in SPLITS.values() for f in pair)
IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049
_COUNTS = {"train": 60000, "test": 10000}
# MD5 of the decompressed IDX files. Fashion-MNIST's published gz MD5s (8d4fb7e6..., 25c81989...,
# bef4ecab..., bb300cfd...) do not match Debian's gz files, whose gzip headers omit the file name;
# the decompressed bytes are identical.
_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
_MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_SYSTEM_DIRS: dict[str, tuple[Path, ...]] = {"fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"),)}
_TIMEOUT_S = 30.0


class DataError(Exception):
    """Any problem with the dataset files; the message names the problem and the fix."""


class ChecksumError(DataError):
    """A file's decompressed content does not have the expected MD5."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """One split in memory: ``images`` float32 (N, 1, 28, 28) in [0, 1], ``labels`` int64 (N,)."""

    name: str
    split: str
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, split={self.split!r}, images={tuple(self.images.shape)})"


def _check_name(name: str) -> str:
    key = str(name).lower().replace("_", "-")
    if key not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return key


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    return split


def _cache_dir(name: str) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "lowbit" / name


def _search_dirs(name: str, data_dir: str | os.PathLike | None) -> list[Path]:
    if data_dir is not None:
        roots = [Path(data_dir).expanduser()]
    else:
        roots = [Path(os.environ["LOWBIT_DATA_DIR"]).expanduser()] if os.environ.get("LOWBIT_DATA_DIR") else []
        roots += [_cache_dir(name), *_SYSTEM_DIRS.get(name, ())]
    dirs: list[Path] = []
    for folder in (d for root in roots for d in ((root,) if root.name == name else (root, root / name))):
        if folder not in dirs:
            dirs.append(folder)
    return dirs


def _files_in(folder: Path, bases: tuple[str, ...]) -> dict[str, Path] | None:
    found = {}
    for base in bases:  # the raw file reads faster, so it wins over the .gz
        path = next((p for p in (folder / base, folder / f"{base}.gz") if p.is_file()), None)
        if path is None:
            return None
        found[base] = path
    return found


def find_files(name: str, data_dir: str | os.PathLike | None = None, split: str | None = None) -> dict[str, Path] | None:
    """The first search folder holding all files of ``split`` (all four if None), as {base name: path}."""
    name = _check_name(name)
    bases = SPLITS[_check_split(split)] if split is not None else FILES
    return next((f for d in _search_dirs(name, data_dir) if (f := _files_in(d, bases))), None)


_FIX_FILE = "Fix: delete it and re-download it (or copy a complete file there)."


def _read_bytes(path: Path, what: str | None = None, fix: str | None = None) -> bytes:
    """The decompressed content of ``path`` (gzip detected by its magic bytes).  ``what`` names
    the file in errors (default: its path), ``fix`` ends them."""
    what = what or str(path)
    try:
        data = path.read_bytes()
        return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    except EOFError:
        raise DataError(f"{what}: truncated gzip file (an interrupted download or copy). " + (fix or
                        "Fix: delete it and run again to re-download, or copy a complete file there.")) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{what}: corrupt gzip data ({e}). " + (fix or "Fix: delete it and re-download it.")) from None
    except OSError as e:
        raise DataError(f"{what}: cannot read ({e}). " + (fix or "Fix: check the path and its permissions.")) from None


def _parse_idx(data: bytes, path: Path, magic: int | None = None, what: str | None = None,
               fix: str = _FIX_FILE) -> np.ndarray:
    what = what or str(path)
    if len(data) < 4:
        raise DataError(f"{what}: truncated IDX file ({len(data)} bytes). {fix}")
    found = int.from_bytes(data[:4], "big")
    if found not in (IMAGES_MAGIC, LABELS_MAGIC) or (magic is not None and found != magic):
        want = magic if magic is not None else f"{IMAGES_MAGIC} or {LABELS_MAGIC}"
        kind = {IMAGES_MAGIC: "an IDX image file", LABELS_MAGIC: "an IDX label file"}.get(magic, "an IDX file")
        raise DataError(f"{what}: not {kind} (magic number {found}, expected {want}; images 2051, "
                        f"labels 2049). {fix}")
    ndim = found & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{what}: truncated IDX header. {fix}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = int(np.prod(dims))
    if len(data) - header != size:
        state = "truncated" if len(data) - header < size else "too long"
        raise DataError(f"{what}: {state}: the header promises {size} bytes of data for shape {dims}, "
                        f"the file has {len(data) - header}. {fix}")
    return np.frombuffer(data, np.uint8, count=size, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gz or raw); validates the magic number, dimensions and length."""
    path = Path(path)
    return _parse_idx(_read_bytes(path), path, magic)


def _verify(name: str, base: str, data: bytes, path: Path) -> None:
    got = hashlib.md5(data, usedforsecurity=False).hexdigest()
    if got != _MD5[name][base]:
        other = next((o for o, sums in _MD5.items() if o != name and sums.get(base) == got), None)
        if other is not None:  # an intact file of another data set: nothing to delete
            raise ChecksumError(f"{path} is {other}'s {base} (intact), not {name}'s. Fix: point lowbit at a "
                                f"folder holding {name} (--data-dir or LOWBIT_DATA_DIR); keep this file.")
        raise ChecksumError(f"{path}: decompressed MD5 {got} is not the {name} {base} checksum "
                            f"{_MD5[name][base]}; the file is damaged or from another dataset. "
                            f"Fix: delete it (it is re-downloaded) or point lowbit at the right folder.")


def _load(name: str, split: str, files: dict[str, Path]) -> Dataset:
    img_base, lab_base = SPLITS[split]
    expect, arrays = _COUNTS[split], {}
    for base, magic in ((lab_base, LABELS_MAGIC), (img_base, IMAGES_MAGIC)):  # labels first: cheap mismatch
        path = files[base]
        data = _read_bytes(path)
        arr = _parse_idx(data, path, magic)
        if arr.shape[0] != expect or (magic == IMAGES_MAGIC and arr.shape[1:] != (28, 28)):
            raise DataError(f"{path}: shape {arr.shape}, expected {expect} items (28x28 images) for the "
                            f"{split} split. Fix: delete it and re-download it.")
        _verify(name, base, data, path)
        arrays[base] = arr
    labels = arrays[lab_base]
    if labels.max(initial=0) > 9:
        raise DataError(f"{files[lab_base]}: labels outside 0..9. Fix: delete it and re-download it.")
    images = np.divide(arrays[img_base], np.float32(255), dtype=np.float32)
    return Dataset(name, split, torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def _fetch(url: str, dest: Path, progress: bool, check: Callable[[Path], None]) -> None:
    """Download ``url`` to a temp file next to ``dest``; ``check`` it, then rename it atomically."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "lowbit"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=_TIMEOUT_S) as resp, Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            console=Console(stderr=True), transient=True, disable=not progress,
        ) as bar:
            total = int(resp.headers.get("Content-Length") or 0) or None
            task, done = bar.add_task(f"downloading {dest.name}", total=total), 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                bar.advance(task, len(chunk))
        if total is not None and done != total:
            raise DataError(f"truncated download ({done} of {total} bytes)")
        check(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache/data folder may be shared
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


#: a partial download older than this is from a killed process, not a concurrent one
_STALE_PART_S = 3600


def _remove_stale_parts(folder: Path, name: str) -> None:
    """Delete ``.<name>.*.part`` files left by downloads killed hard (SIGKILL, power loss)."""
    now = time.time()
    for part in folder.glob(f".{name}.*.part"):
        try:
            if now - part.stat().st_mtime > _STALE_PART_S:
                part.unlink()
        except OSError:
            pass


def _download(name: str, bases: tuple[str, ...], target: Path, progress: bool) -> list[str]:
    """Download the missing ``bases`` into ``target``; returns the failures ([] when all succeeded)."""
    env = os.environ.get("LOWBIT_MIRROR")
    mirrors = (env,) if env else _MIRRORS[name]
    created = [d for d in (target, *target.parents) if not d.exists()]
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [f"cannot create {target}: {e}"]
    errors: list[str] = []
    for base in bases:
        if _files_in(target, (base,)):
            continue
        _remove_stale_parts(target, f"{base}.gz")

        def check(tmp: Path, base: str = base) -> None:
            what, fix = f"the downloaded {base}.gz", "(deleted, nothing kept)"
            data = _read_bytes(tmp, what, fix)
            _parse_idx(data, tmp, IMAGES_MAGIC if "images" in base else LABELS_MAGIC, what, fix)
            got, want = hashlib.md5(data, usedforsecurity=False).hexdigest(), _MD5[name][base]
            if got != want:
                raise ChecksumError(f"decompressed MD5 {got}, expected {want}: the mirror sent a damaged "
                                    f"or different file (deleted, nothing kept)")

        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{base}.gz"
            try:
                _fetch(url, target / f"{base}.gz", progress, check)
                break
            except ChecksumError as e:
                errors.append(f"{url}: wrong checksum ({e})")
            except (DataError, OSError, ValueError, http.client.HTTPException) as e:  # ValueError: bad URL
                errors.append(f"{url}: {e}")
        else:
            for d in created:  # leave no empty folders behind
                try:
                    d.rmdir()
                except OSError:
                    break
            return errors
    return []


def load_dataset(name: str = "mnist", split: str = "train", data_dir: str | os.PathLike | None = None, *,
                 download: bool = True, progress: bool = True) -> Dataset:
    """Load one split of ``mnist`` or ``fashion-mnist`` (see the module docstring for the search order).

    Raises ``DataError`` (with the fix in its message) for unknown names, missing, damaged or
    mismatching files, and failed downloads.
    """
    name, split = _check_name(name), _check_split(split)
    if data_dir is not None and Path(data_dir).expanduser().exists() and not Path(data_dir).expanduser().is_dir():
        raise DataError(f"data folder {data_dir} is a file, not a folder. Fix: pass the folder that holds the "
                        f"four IDX files (--data-dir DIR, data_dir=DIR)")
    dirs, rejected = _search_dirs(name, data_dir), []
    for folder in dirs:
        files = _files_in(folder, SPLITS[split])
        if files:
            try:
                return _load(name, split, files)
            except ChecksumError as e:  # e.g. MNIST files in a folder searched for Fashion-MNIST
                rejected.append(str(e))
    errors: list[str] = []
    if download:
        root = Path(data_dir).expanduser() if data_dir is not None else _cache_dir(name)
        target = root if root.name == name else root / name
        errors = _download(name, SPLITS[split], target, progress)
        if not errors:
            return _load(name, split, _files_in(target, SPLITS[split]) or {})
    hint = ("\n  or install it system-wide: apt-get install dataset-fashion-mnist "
            "(files land in /usr/share/datasets/fashion-mnist)") if name == "fashion-mnist" else ""
    if data_dir is not None:
        fix = (f"Fix: put the four files in that folder (or its {name}/ subfolder) or pass another --data-dir; "
               "with --data-dir given, LOWBIT_DATA_DIR and the cache are not searched")
    else:
        fix = ("Fix: put the four files in one folder and pass --data-dir DIR (data_dir=DIR) or set "
               f"LOWBIT_DATA_DIR=DIR (DIR or DIR/{name}/ both work)")
    raise DataError(
        f"{name} {split} files not found{' and the download failed' if download else ''}. "
        f"Needed for the {split} split (gzipped .gz or raw): {', '.join(SPLITS[split])}.\n"
        f"Searched: {', '.join(map(str, dirs))}\n"
        + "".join(f"  {d} has {', '.join(has)} but not {', '.join(b for b in SPLITS[split] if b not in has)}\n"
                  for d in dirs if (has := [b for b in SPLITS[split] if _files_in(d, (b,))])
                  and len(has) < len(SPLITS[split]))
        + "".join(f"Rejected: {r}\n" for r in rejected)
        + ("Download attempts:\n" + "".join(f"  {e}\n" for e in errors) if download else "Download disabled.\n")
        + fix + hint
    )
