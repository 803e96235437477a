"""nmjax.datasets: IDX parsing, deterministic splits, overrides and clear messages when absent."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from nmjax import datasets


def _write_idx(path, array):
    header = (0x0800 | array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion(tmp_path, n_train=40, n_test=10):
    rng = np.random.default_rng(0)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 28, 28)),
              "train_y": rng.integers(0, 10, n_train),
              "test_x": rng.integers(0, 256, (n_test, 28, 28)),
              "test_y": rng.integers(0, 10, n_test)}
    for key, name in datasets.FASHION_FILES.items():
        _write_idx(tmp_path / name, arrays[key])
    return arrays


def test_fashion_mnist_reads_idx_and_splits_deterministically(tmp_path, monkeypatch):
    arrays = _fake_fashion(tmp_path)
    monkeypatch.setenv("NMJAX_DATA", str(tmp_path))
    data = datasets.fashion_mnist(val=8)
    assert data.train.x.shape == (32, 28, 28, 1) and data.val.x.shape == (8, 28, 28, 1)
    assert data.test.x.dtype == np.float32 and 0 <= data.test.x.min() <= data.test.x.max() <= 1
    np.testing.assert_array_equal(data.test.y, arrays["test_y"])
    np.testing.assert_allclose(data.test.x[..., 0], arrays["test_x"] / 255.0, rtol=1e-6)
    # train + val is a permutation of the training file, the same one every time.
    both = np.concatenate([data.train.y, data.val.y])
    assert sorted(both) == sorted(arrays["train_y"])
    again = datasets.fashion_mnist(val=8)
    np.testing.assert_array_equal(again.val.x, data.val.x)


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NMJAX_DATA", str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_DIRS", ())
    monkeypatch.setattr(datasets, "DOCS_DIRS", ())
    with pytest.raises(datasets.DataMissing, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist()
    with pytest.raises(datasets.DataMissing, match="apt-get install python3-doc"):
        datasets.python_docs_text()
    pytest.importorskip("sklearn")
    data = datasets.vision()          # falls back, and says so
    assert data.name.startswith("digits")
    corpus = datasets.text(quiet=True)
    assert corpus.name.endswith("standard library sources") and corpus.train.dtype == np.uint8


def test_bad_idx_is_refused(tmp_path):
    bad = tmp_path / "x.gz"
    with gzip.open(bad, "wb") as f:
        f.write((0x0D03).to_bytes(4, "big") + b"\x00" * 12)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        datasets._read_idx(bad)


def test_text_splits_by_document(tmp_path, monkeypatch):
    docs = tmp_path / "python-docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"page{i:02d}.txt").write_text(f"page {i} " * 20)
    monkeypatch.setenv("NMJAX_DATA", str(tmp_path))
    data = datasets.python_docs_text()
    total = sum(len(s) for s in (data.train, data.val, data.test))
    assert total == sum(len(f"page {i} " * 20) for i in range(40)) + 37  # 37 joins
    assert b"page" in data.val.tobytes()


def test_split_sizes_and_nmjax_data_are_checked(tmp_path, monkeypatch):
    _fake_fashion(tmp_path)
    monkeypatch.setenv("NMJAX_DATA", str(tmp_path))
    # val=-1 used to slice x[-1:] as training: a one-image training set, silently.
    for val in (-1, 40, 41):
        with pytest.raises(ValueError, match=rf"val={val} must be in \[0, 40\)"):
            datasets.fashion_mnist(val=val)
    with pytest.raises(TypeError, match="val must be an int"):
        datasets.fashion_mnist(val=2.5)
    assert len(datasets.fashion_mnist(val=0).train.y) == 40
    # An NMJAX_DATA that is not a directory is refused, not skipped for the system paths.
    for bad in (str(tmp_path / "absent"), str(tmp_path / datasets.FASHION_FILES["test_y"]), ""):
        monkeypatch.setenv("NMJAX_DATA", bad)
        with pytest.raises(ValueError, match="NMJAX_DATA=.* is not an existing directory"):
            datasets.fashion_mnist()
        with pytest.raises(ValueError, match="NMJAX_DATA"):
            datasets.python_docs_text()
