"""Real datasets that install offline, for the examples, benchmarks and notebooks.

Nothing here downloads. Each loader reads files a system package puts on disk and says how to
get them when they are absent:

* :func:`fashion_mnist`: Fashion-MNIST (60,000 + 10,000 images, 28x28, 10 classes, MIT
  licence) from Debian's ``dataset-fashion-mnist`` (IDX files under
  ``/usr/share/datasets/fashion-mnist``);
* :func:`digits`: scikit-learn's 8x8 digits (1,797 images, shipped with scikit-learn), the
  fallback where the Debian package is not available;
* :func:`python_docs_text`: the Python documentation sources (about 11 M characters of
  English technical prose, PSF licence) from Debian's ``python3-doc``, for a byte-level
  language model; :func:`vision` and :func:`text` pick what is installed and say so.

``NMJAX_DATA`` (a directory holding the Fashion-MNIST IDX files, or a ``python-docs``
directory of ``.txt`` sources) is searched before the system locations; when set, it must
name an existing directory.

Why this module is in the package although the library does not use it: the examples, the
notebooks, the benchmarks and the tests all load the same splits, and they run from
different directories with only ``nmjax`` importable; a copy under ``examples/`` would need
``sys.path`` edits in each of them. It is loaded lazily (``nmjax.datasets``), imports only
NumPy, and nothing in ``nmjax`` imports it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
DOCS_DIRS = tuple(f"/usr/share/doc/{name}/html/_sources"
                  for name in ("python3-doc", "python3.11-doc", "python3.12-doc",
                               "python3.13-doc", "python3"))
FASHION_FILES = {"train_x": "train-images-idx3-ubyte.gz", "train_y": "train-labels-idx1-ubyte.gz",
                 "test_x": "t10k-images-idx3-ubyte.gz", "test_y": "t10k-labels-idx1-ubyte.gz"}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


class DataMissing(FileNotFoundError):
    """A dataset's files are not on this machine (the message says how to get them)."""


class Split(NamedTuple):
    """Images ``x: (N, H, W, 1)`` float32 in [0, 1] and labels ``y: (N,)`` int32."""

    x: np.ndarray
    y: np.ndarray


class VisionData(NamedTuple):
    """Train / validation / test splits of an image-classification dataset."""

    name: str
    train: Split
    val: Split
    test: Split
    classes: tuple[str, ...]


def _override() -> str | None:
    """``$NMJAX_DATA``, checked: unset, or an existing directory."""
    value = os.environ.get("NMJAX_DATA")
    if value is None:
        return None
    if not value.strip() or not Path(value).is_dir():
        raise ValueError(f"NMJAX_DATA={value!r} is not an existing directory; point it at a "
                         "directory holding the dataset files, or unset it")
    return value


def _check_split_size(value: object, name: str, total: int, low: int = 0) -> int:
    """A validation / test split size: an int in ``[low, total)`` (training keeps >= 1)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not low <= value < total:
        raise ValueError(f"{name}={value} must be in [{low}, {total}): the split takes "
                         f"{name} of {total} images and training keeps the rest (at least 1)")
    return int(value)


def _search(dirs: tuple[str, ...], override: str | None, needed: list[str]) -> Path | None:
    candidates = ([override] if override else []) + list(dirs)
    for d in candidates:
        path = Path(d)
        if all((path / name).exists() for name in needed):
            return path
    return None


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip): big-endian header (magic, dims), then unsigned bytes."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic >> 8 != 0x08:  # 0x08: unsigned byte
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {body.size} bytes for dims {dims}")
    return body.reshape(dims)


def _split(x: np.ndarray, y: np.ndarray, val: int, seed: int) -> tuple[Split, Split]:
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return Split(x[val:], y[val:]), Split(x[:val], y[:val])


def fashion_mnist(*, val: int = 5000, seed: int = 0) -> VisionData:
    """Fashion-MNIST: the 60,000 training images split into ``60000 - val`` train and
    ``val`` validation images (a fixed shuffle by ``seed``), and the 10,000 test images.

    Raises:
      DataMissing: the IDX files are neither in ``$NMJAX_DATA`` nor where Debian's
        ``dataset-fashion-mnist`` installs them (the message says how to install it).
      TypeError, ValueError: ``val`` not an int in ``[0, 60000)``; ``NMJAX_DATA`` set to
        something other than an existing directory.
    """
    path = _search(FASHION_DIRS, _override(), list(FASHION_FILES.values()))
    if path is None:
        raise DataMissing(
            "Fashion-MNIST is not installed: `sudo apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu), or put the four IDX .gz files in a directory named by "
            "NMJAX_DATA")
    arrays = {k: _read_idx(path / name) for k, name in FASHION_FILES.items()}
    val = _check_split_size(val, "val", len(arrays["train_y"]))
    scale = lambda a: (a.astype(np.float32) / 255.0)[..., None]  # noqa: E731
    train, valid = _split(scale(arrays["train_x"]), arrays["train_y"].astype(np.int32), val,
                          seed)
    test = Split(scale(arrays["test_x"]), arrays["test_y"].astype(np.int32))
    return VisionData("Fashion-MNIST", train, valid, test, FASHION_CLASSES)


def digits(*, val: int = 200, test: int = 300, seed: int = 0) -> VisionData:
    """scikit-learn's 8x8 digits (1,797 images) split train / ``val`` / ``test``.

    Raises:
      DataMissing: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataMissing("the digits fallback needs scikit-learn (pip install scikit-learn)"
                          ) from e
    d = load_digits()
    test = _check_split_size(test, "test", len(d.target))
    val = _check_split_size(val, "val", len(d.target) - test)
    x = (d.data / 16.0).astype(np.float32).reshape(-1, 8, 8, 1)
    y = d.target.astype(np.int32)
    rest, test_split = _split(x, y, test, seed)
    train, valid = _split(rest.x, rest.y, val, seed + 1)
    return VisionData("digits (scikit-learn)", train, valid, test_split,
                      tuple(str(i) for i in range(10)))


def _with_fallback(primary, fallback, quiet: bool):
    try:
        return primary()
    except DataMissing as e:
        data = fallback()
        if not quiet:
            print(f"[nmjax.datasets] {e}\n[nmjax.datasets] falling back to {data.name}",
                  flush=True)
        return data


def vision(*, quiet: bool = False) -> VisionData:
    """Fashion-MNIST when installed, else scikit-learn's digits, saying which (unless
    ``quiet``)."""
    return _with_fallback(fashion_mnist, digits, quiet)


class TextData(NamedTuple):
    """A byte-level corpus: ``uint8`` train / validation / test streams."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _byte_splits(name: str, docs: list[bytes], seed: int) -> TextData:
    # Whole documents go to one split (90/5/5 of the documents, a fixed shuffle), so the
    # validation text is not the tail of a training page.
    order = np.random.default_rng(seed).permutation(len(docs))
    n = len(docs)
    cut1, cut2 = int(n * 0.9), int(n * 0.95)
    join = lambda idx: np.frombuffer(b"\n".join(docs[i] for i in idx), np.uint8)  # noqa: E731
    return TextData(name, join(order[:cut1]), join(order[cut1:cut2]), join(order[cut2:]))


def python_docs_text(*, seed: int = 0) -> TextData:
    """The Python documentation's reStructuredText sources as bytes (Debian's
    ``python3-doc``), split by document 90/5/5.

    Raises:
      DataMissing: the sources are neither under ``$NMJAX_DATA/python-docs`` nor where
        ``python3-doc`` installs them.
    """
    override = _override()
    candidates = ([str(Path(override) / "python-docs")] if override else []) + list(DOCS_DIRS)
    for d in candidates:
        files = sorted(Path(d).rglob("*.txt")) if Path(d).is_dir() else []
        if len(files) > 20:
            docs = [f.read_bytes() for f in files]
            return _byte_splits("Python documentation (python3-doc)", docs, seed)
    raise DataMissing("the Python documentation sources are not installed: `sudo apt-get "
                      "install python3-doc` (Debian/Ubuntu), or put .txt files under "
                      "$NMJAX_DATA/python-docs")


def stdlib_text(*, seed: int = 0) -> TextData:
    """The fallback corpus: the docstrings-and-code of the running Python's standard
    library modules (``.py`` sources, shipped with every Python), split by file."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))[:400]
    return _byte_splits(f"Python {sysconfig.get_python_version()} standard library sources",
                        [f.read_bytes() for f in files], seed)


def text(*, quiet: bool = False) -> TextData:
    """The Python docs when installed, else the standard library's sources, saying which."""
    return _with_fallback(python_docs_text, stdlib_text, quiet)


__all__ = [
    "FASHION_CLASSES",
    "DataMissing",
    "Split",
    "TextData",
    "VisionData",
    "digits",
    "fashion_mnist",
    "python_docs_text",
    "stdlib_text",
    "text",
    "vision",
]
