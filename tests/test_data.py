"""The MNIST loader: IDX parsing, content checks, lookup order, download path, the real files.

No test touches the network: downloads are served from ``file://`` URLs or a
fake opener.
"""
import errno
import gzip
import hashlib
import http.client
import os
import re
import shutil
import struct
import tempfile

import numpy as np
import pytest

from scratchnet import data as D

from conftest import mnist_dir, needs_mnist

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def idx_bytes(array):
    """An uint8 array as an IDX byte stream: 0, 0, 0x08, ndim, sizes (big-endian), values."""
    array = np.asarray(array, dtype=np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_gz(path, raw):
    with gzip.open(path, "wb") as f:
        f.write(raw)
    return str(path)


# ===== parsing =====

def test_parses_a_small_idx_file_written_here(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    raw = idx_bytes(images)
    path = write_gz(tmp_path / "tiny-idx3-ubyte.gz", raw)
    out = D.read_idx_gz(path, sha256=hashlib.sha256(raw).hexdigest())
    assert out.shape == (3, 4, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)
    labels = D.parse_idx(idx_bytes([7, 2, 1]), "labels")
    np.testing.assert_array_equal(labels, [7, 2, 1])


def test_parses_big_endian_int32_idx():
    values = np.array([[1, -2], [300000, 4]], dtype=">i4")
    raw = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 2) + values.tobytes()
    out = D.parse_idx(raw, "ints")
    np.testing.assert_array_equal(out, [[1, -2], [300000, 4]])


def test_bad_magic_number_is_rejected_with_the_file_name(tmp_path):
    raw = bytearray(idx_bytes(np.zeros((2, 2), np.uint8)))
    raw[0] = 0x1F                                     # not two zero bytes
    path = write_gz(tmp_path / "bad-magic.gz", bytes(raw))
    with pytest.raises(D.DataError, match=r"bad-magic\.gz.*magic number"):
        D.read_idx_gz(path)


def test_truncated_idx_content_is_rejected_not_parsed(tmp_path):
    raw = idx_bytes(np.ones((4, 28, 28), np.uint8))[:-100]
    path = write_gz(tmp_path / "short-idx3-ubyte.gz", raw)
    with pytest.raises(D.DataError, match=r"short-idx3-ubyte\.gz.*\(4, 28, 28\).*truncated"):
        D.read_idx_gz(path)


def test_truncated_gzip_stream_is_rejected_with_the_file_name(tmp_path):
    path = write_gz(tmp_path / "cut.gz", idx_bytes(np.random.default_rng(0).integers(0, 255, (50, 28, 28))))
    with open(path, "rb") as f:
        head = f.read()[: os.path.getsize(path) // 2]
    with open(path, "wb") as f:
        f.write(head)
    with pytest.raises(D.DataError, match=r"cut\.gz: cannot decompress"):
        D.read_idx_gz(path)


def test_checksum_mismatch_names_the_file_and_both_digests(tmp_path):
    raw = idx_bytes(np.zeros((2, 3), np.uint8))
    path = write_gz(tmp_path / "wrong.gz", raw)
    expected = "0" * 64
    with pytest.raises(D.DataError) as info:
        D.read_idx_gz(path, sha256=expected)
    message = str(info.value)
    assert "wrong.gz" in message and expected in message and hashlib.sha256(raw).hexdigest() in message


# ===== lookup order =====

def fake_files(folder):
    """The four file names, with no content: enough for the lookup, which only checks presence."""
    os.makedirs(folder, exist_ok=True)
    for name in D.FILES.values():
        open(os.path.join(folder, name), "wb").close()
    return str(folder)


def test_lookup_order_explicit_then_env_then_user_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_DIR", str(tmp_path / "home-cache"))
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    assert D.find_mnist_dir(tmp_path / "explicit")[:2] == (str(tmp_path / "explicit"), "--data-dir")
    assert D.find_mnist_dir()[:2] == (str(tmp_path / "env"), "$SCRATCHNET_DATA")
    monkeypatch.delenv(D.ENV_VAR)
    where = D.find_mnist_dir()
    assert (where.folder, where.source) == (str(tmp_path / "home-cache"), "the default cache")
    assert where.missing == tuple(D.FILES.values()) and not where.present
    fake_files(tmp_path / "home-cache")
    assert D.find_mnist_dir().present and D.find_mnist_dir().missing == ()


def test_the_default_cache_is_under_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert D.find_mnist_dir().folder == str(tmp_path / ".cache" / "scratchnet" / "mnist")


def test_a_named_folder_is_the_one_used_never_a_silent_fallback(tmp_path, monkeypatch):
    """$SCRATCHNET_DATA (or --data-dir) names an incomplete folder while the user cache holds
    all four files: the named folder is reported as missing them, the cache is not used."""
    monkeypatch.setattr(D, "DEFAULT_DIR", fake_files(tmp_path / "home-cache"))
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(D.DataNotFoundError) as info:
        D.find_mnist(download=False)
    assert str(tmp_path / "env") in str(info.value) and "$SCRATCHNET_DATA" in str(info.value)
    with pytest.raises(D.DataNotFoundError, match="from --data-dir"):
        D.find_mnist(tmp_path / "elsewhere", download=False)
    monkeypatch.setenv(D.ENV_VAR, fake_files(tmp_path / "env"))
    assert D.find_mnist(download=False) == str(tmp_path / "env")


@needs_mnist
def test_the_env_folder_is_read(monkeypatch):
    monkeypatch.setenv(D.ENV_VAR, mnist_dir())
    assert D.find_mnist(download=False) == mnist_dir()
    assert D.load_mnist(validation=0, download=False).data_dir == mnist_dir()


# ===== folders that cannot be used =====

def _offline(url):
    raise AssertionError(f"no download may be tried, got {url}")


def test_a_data_dir_that_is_a_file_is_named_not_a_directory(tmp_path):
    not_a_folder = tmp_path / "mnist.tar"
    not_a_folder.write_bytes(b"x")
    for download in (True, False):
        with pytest.raises(D.DataFolderError, match=re.escape(f"{not_a_folder} (from --data-dir) is not a directory")):
            D.find_mnist(not_a_folder, download=download, opener=_offline, progress=False)


def test_a_folder_under_a_file_cannot_take_a_download_and_says_why(tmp_path, monkeypatch):
    """A real failure even for root: a folder cannot be created under a regular file."""
    (tmp_path / "file").write_bytes(b"x")
    target = tmp_path / "file" / "mnist"
    monkeypatch.setenv(D.ENV_VAR, str(target))
    with pytest.raises(D.DataFolderError) as info:
        D.load_mnist(opener=_offline, progress=False)
    message = str(info.value)
    assert str(target) in message and "$SCRATCHNET_DATA" in message and "Not a directory" in message
    assert ".part" not in message


def _read_only(monkeypatch, folder):
    """Make creating files in ``folder`` fail with EACCES, as a read-only folder does for a non-root user
    (chmod alone does not stop root, who runs these tests in CI)."""
    real_mkstemp = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and os.path.abspath(dir) == os.path.abspath(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, "tmpXXXX"))
        return real_mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_a_read_only_folder_missing_files_names_the_folder_and_the_reason(tmp_path, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    _read_only(monkeypatch, folder)
    with pytest.raises(D.DataFolderError) as info:
        D.load_mnist(folder, opener=_offline, progress=False)
    message = str(info.value)
    assert f"{folder} (from --data-dir)" in message and "Permission denied" in message
    assert ".part" not in message and "no network" not in message
    assert os.listdir(folder) == []
    # download_file itself says the same, before trying any mirror
    with pytest.raises(D.DataFolderError, match=re.escape(str(folder)) + ".*Permission denied"):
        D.download_file("t10k-labels-idx1-ubyte.gz", str(folder), mirrors=["https://m.invalid/"],
                        opener=_offline, progress=False)


def test_a_read_only_folder_holding_the_files_is_only_read(tmp_path, monkeypatch):
    folder = fake_files(tmp_path / "readonly")
    _read_only(monkeypatch, folder)
    assert D.find_mnist(folder, opener=_offline, progress=False) == folder


@needs_mnist
def test_real_files_load_from_a_read_only_copy(tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in D.FILES.values():
        shutil.copy(os.path.join(mnist_dir(), name), folder / name)
        os.chmod(folder / name, 0o444)
    os.chmod(folder, 0o555)
    _read_only(monkeypatch, folder)
    try:
        data = D.load_mnist(folder, validation=0, opener=_offline, progress=False)
    finally:
        os.chmod(folder, 0o755)
    assert data.test_x.shape == (10000, 1, 28, 28) and data.data_dir == str(folder)


def test_missing_files_without_download_say_which_and_where(tmp_path):
    with pytest.raises(D.DataNotFoundError) as info:
        D.load_mnist(tmp_path, download=False)
    message = str(info.value)
    assert str(tmp_path) in message
    assert all(name in message for name in D.FILES.values())


# ===== downloading =====

def test_no_network_error_names_missing_files_and_where_to_put_them(tmp_path):
    def offline(url):
        raise OSError("network is unreachable")
    with pytest.raises(D.DataNotFoundError) as info:
        D.load_mnist(tmp_path, mirrors=["https://mirror.invalid/mnist/"], opener=offline, progress=False)
    message = str(info.value)
    assert "no network" in message and "copy" in message and str(tmp_path) in message
    assert "train-images-idx3-ubyte.gz" in message
    assert os.listdir(tmp_path) == []                  # nothing half-written left behind


@needs_mnist
def test_download_from_file_url_mirror_after_a_failing_one(tmp_path):
    """The first mirror is dead, the second a local file:// copy: every file is fetched,
    checked and moved into place, and the data loads."""
    target = tmp_path / "downloaded"
    mirrors = [(tmp_path / "dead").as_uri() + "/", "file://" + mnist_dir() + "/"]
    folder = D.find_mnist(target, mirrors=mirrors, progress=False)
    assert folder == str(target)
    assert sorted(os.listdir(target)) == sorted(D.FILES.values())   # no temporary files remain
    data = D.load_mnist(target, download=False)
    assert data.test_x.shape == (10000, 1, 28, 28)


@needs_mnist
def test_a_mirror_serving_a_corrupt_file_is_rejected_and_leaves_nothing(tmp_path):
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    name = "t10k-labels-idx1-ubyte.gz"
    labels = D.read_idx_gz(os.path.join(mnist_dir(), name)).copy()
    labels[0] = (labels[0] + 1) % 10                   # one wrong label: right size, wrong content
    write_gz(bad_mirror / name, idx_bytes(labels))
    target = tmp_path / "target"
    with pytest.raises(D.DataNotFoundError, match=r"SHA-256"):
        D.download_file(name, str(target), mirrors=[bad_mirror.as_uri() + "/"], progress=False)
    assert os.listdir(target) == []
    # with a good mirror behind the bad one, the good copy wins
    good = D.download_file(name, str(target), mirrors=[bad_mirror.as_uri() + "/", "file://" + mnist_dir() + "/"],
                           progress=False)
    assert os.listdir(target) == [name] and good == str(target / name)


@pytest.mark.parametrize("error", [ConnectionResetError("connection reset"),
                                   http.client.IncompleteRead(b"x" * 12, 988)])
def test_interrupted_download_never_appears_under_the_final_name(tmp_path, error):
    class Broken:
        headers = {"Content-Length": "1000"}

        def __init__(self):
            self.calls, self.error = 0, error

        def read(self, n):
            self.calls += 1
            if self.calls > 1:
                raise self.error
            return b"\x1f\x8b" + b"x" * 10

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    with pytest.raises(D.DataNotFoundError, match="could not download t10k-labels"):
        D.download_file("t10k-labels-idx1-ubyte.gz", str(tmp_path), mirrors=["https://m.invalid/"],
                        opener=lambda url: Broken(), progress=False)
    assert os.listdir(tmp_path) == []


# ===== the real files =====

@needs_mnist
def test_real_files_shapes_dtypes_ranges_and_label_counts():
    data = D.load_mnist(mnist_dir(), download=False)
    assert data.train_x.shape == (55000, 1, 28, 28) and data.val_x.shape == (5000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    for x in (data.train_x, data.val_x, data.test_x):
        assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    for y in (data.train_y, data.val_y, data.test_y):
        assert y.dtype == np.int64
    all_train = np.concatenate([data.train_y, data.val_y])
    assert np.bincount(all_train, minlength=10).tolist() == TRAIN_COUNTS
    assert np.bincount(data.test_y, minlength=10).tolist() == TEST_COUNTS
    assert data.test_y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]


@needs_mnist
def test_validation_split_is_seeded_and_disjoint():
    a = D.load_mnist(mnist_dir(), validation=1000, seed=3, download=False)
    b = D.load_mnist(mnist_dir(), validation=1000, seed=3, download=False)
    c = D.load_mnist(mnist_dir(), validation=1000, seed=4, download=False)
    np.testing.assert_array_equal(a.val_x, b.val_x)
    assert not np.array_equal(a.val_x, c.val_x)
    assert len(a.train_x) == 59000 and len(a.val_x) == 1000
    # no validation image is also a training image (compare the raw pixel rows)
    train_rows = {row.tobytes() for row in (a.train_x.reshape(len(a.train_x), -1) * 255).astype(np.uint8)}
    val_rows = [row.tobytes() for row in (a.val_x.reshape(1000, -1) * 255).astype(np.uint8)]
    assert sum(r in train_rows for r in val_rows) <= 5   # MNIST has a handful of exact duplicate digits


def test_validation_size_out_of_range_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="validation must be"):
        D.load_mnist(tmp_path, validation=60000, download=False)


@needs_mnist
def test_a_corrupted_copy_of_a_real_file_is_named(tmp_path):
    for name in D.FILES.values():
        shutil.copy(os.path.join(mnist_dir(), name), tmp_path / name)
    name = "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress((tmp_path / name).read_bytes()))
    raw[100] ^= 1                                     # flip one bit of one label
    write_gz(tmp_path / name, bytes(raw))
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte\.gz: SHA-256"):
        D.load_mnist(tmp_path, download=False)
