"""MNIST: find, download, verify and parse the four IDX files.

The four standard files (gzip-compressed IDX) live in ONE folder, the first
of these that is set (``find_mnist_dir``):

1. the ``data_dir`` argument (``--data-dir`` on the command line);
2. the folder named by the environment variable ``SCRATCHNET_DATA``;
3. the user cache ``~/.cache/scratchnet/mnist``.

A folder you name is the folder used: when it lacks files, they are
downloaded into it, never looked for elsewhere, so you always know which copy
was read. Where files are missing they are downloaded (when ``download=True``)
from the mirrors in ``MIRRORS`` in turn. A folder that cannot take them (not
a directory, not writable) is an error naming the folder, how it was chosen
and the system's reason; a folder that already holds all four files is only
read, so a read-only copy works. A download goes to a temporary name in the
target folder and is moved into place only after its content has been checked,
so a half-downloaded file never sits under the final name.

Every file is checked by the SHA-256 of its *decompressed* IDX bytes (the
values in ``IDX_SHA256``), so any faithful mirror's copy passes whatever gzip
wrapper it used, and a truncated, corrupted or wrong file is rejected with an
error that names it; it is never parsed into partial data.

IDX format (big-endian): two zero bytes, a type code (0x08 = unsigned byte),
the number of dimensions d, then d 32-bit sizes, then the values.
"""
import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import files
from .progress import tqdm, write

# The four files, by role.
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# SHA-256 of the decompressed IDX byte streams (the same for every faithful copy).
IDX_SHA256 = {
    "train-images-idx3-ubyte.gz": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte.gz": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte.gz": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte.gz": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# The shapes the headers must announce.
EXPECTED_SHAPES = {
    "train-images-idx3-ubyte.gz": (60000, 28, 28),
    "train-labels-idx1-ubyte.gz": (60000,),
    "t10k-images-idx3-ubyte.gz": (10000, 28, 28),
    "t10k-labels-idx1-ubyte.gz": (10000,),
}

# Public mirrors, tried in order; each URL is the folder that holds the four files.
MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

ENV_VAR = "SCRATCHNET_DATA"
DEFAULT_DIR = os.path.join("~", ".cache", "scratchnet", "mnist")

# IDX type codes -> NumPy dtypes (big-endian where it matters).
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class DataError(ValueError):
    """An MNIST file is truncated, corrupted or not the file it claims to be."""


class DataNotFoundError(FileNotFoundError):
    """MNIST files are missing and could not be downloaded."""


class DataFolderError(DataNotFoundError):
    """The MNIST folder cannot be used: it is not a directory, or it cannot take a download."""


# ===== parsing and checking one file =====

def parse_idx(raw, name="<bytes>"):
    """Parse a complete, decompressed IDX byte string into an array.

    Parameters
    ----------
    raw : bytes, the whole IDX stream
    name : str, the file name used in error messages

    Returns
    -------
    array of shape (d1, ..., dn) with the header's dtype (native byte order)

    Raises
    ------
    DataError if the magic number is wrong or the length does not match the header.
    """
    if len(raw) < 4:
        raise DataError(f"{name}: too short to be an IDX file ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise DataError(f"{name}: bad IDX magic number 0x{raw[:4].hex()} "
                        f"(expected 0x0000TTDD: two zero bytes, a type code, the number of dimensions)")
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(f"{name}: IDX header announces shape {shape} ({expected} bytes in all) "
                        f"but the file holds {len(raw)} bytes ({'truncated' if len(raw) < expected else 'extra data'})")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def read_idx_gz(path, sha256=None):
    """Decompress, verify and parse one ``.gz`` IDX file.

    Parameters
    ----------
    path : str, the ``.gz`` file
    sha256 : str or None, the expected SHA-256 (hex) of the decompressed bytes

    Returns
    -------
    array as in ``parse_idx``

    Raises
    ------
    DataError naming the file for a truncated or corrupt gzip stream, a
    checksum mismatch, or a bad IDX header.
    """
    name = os.path.basename(path)
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as e:   # EOFError: gzip stream cut short
        raise DataError(f"{path}: cannot decompress (truncated or not a gzip file: {e})") from None
    if sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != sha256:
            raise DataError(f"{path}: SHA-256 of the decompressed content is {digest}, expected {sha256} "
                            f"(a corrupted or different file; delete it and fetch a fresh copy)")
    return parse_idx(raw, name)


# ===== finding and downloading =====

class MnistLocation(NamedTuple):
    """Where the loader reads MNIST, as ``find_mnist_dir`` reports it."""
    folder: str       # the folder read (and downloaded into)
    source: str       # how it was chosen, for messages: "--data-dir", "$SCRATCHNET_DATA", "the default cache"
    missing: tuple    # the file names not in it; empty when all four are there

    @property
    def present(self):
        """True when all four files are in ``folder``."""
        return not self.missing


def find_mnist_dir(data_dir=None):
    """The folder the loader uses and which files it lacks; reads no data, writes nothing.

    Parameters
    ----------
    data_dir : folder, or None for ``$SCRATCHNET_DATA``, else ``~/.cache/scratchnet/mnist``

    Returns
    -------
    MnistLocation(folder, source, missing)
    """
    if data_dir is not None:
        folder, source = os.fspath(data_dir), "--data-dir"
    elif os.environ.get(ENV_VAR):
        folder, source = os.environ[ENV_VAR], f"${ENV_VAR}"
    else:
        folder, source = DEFAULT_DIR, "the default cache"
    folder = os.path.expanduser(folder)
    return MnistLocation(folder, source, tuple(_missing(folder)))


def _missing(folder):
    return [f for f in FILES.values() if not os.path.isfile(os.path.join(folder, f))]


def _folder_error(folder, source, error):
    """A DataFolderError naming the folder, how it was chosen (``source``, may be None) and the OSError's reason."""
    reason = error.strerror or str(error)        # "Permission denied", "Not a directory", ...
    where = folder if source is None else f"{folder} (from {source})"
    return DataFolderError(f"MNIST folder {where} cannot take the downloaded files: {reason}. "
                           f"Copy the four files there yourself, or choose a writable folder with "
                           f"--data-dir or ${ENV_VAR}")


def check_writable(folder, source="--data-dir"):
    """Create ``folder`` if needed and write (then delete) a file in it (``files.check_writable``).

    Raises
    ------
    DataFolderError naming the folder, ``source`` and the reason (the errno text).
    """
    try:
        files.check_writable(folder)
    except OSError as e:
        raise _folder_error(folder, source, e) from None


def download_file(name, folder, mirrors=None, opener=None, progress=True):
    """Fetch ``name`` into ``folder`` from the first mirror that serves a correct copy.

    The bytes go to a temporary file in ``folder``; the decompressed content is
    checked against ``IDX_SHA256``; only then is the file renamed to ``name``
    (an atomic move on the same file system).

    Parameters
    ----------
    name : one of the four file names in ``FILES``
    folder : str, where the file should end up
    mirrors : list of base URLs (default ``MIRRORS``); ``file://`` URLs work too
    opener : callable(url) -> file-like response (default ``urllib.request.urlopen``)
    progress : bool, show a tqdm bar

    Returns
    -------
    the final path. Raises DataNotFoundError listing every mirror's failure,
    DataFolderError when ``folder`` cannot be created or written.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    opener = opener or (lambda url: urllib.request.urlopen(url, timeout=30))
    final = os.path.join(folder, name)
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
        except OSError as e:        # the folder's fault, not the mirror's: no point trying the others
            raise _folder_error(folder, None, e) from None
        try:
            with os.fdopen(fd, "wb") as out, opener(url) as response:
                total = response.headers.get("Content-Length") if hasattr(response, "headers") else None
                with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                          desc=f"download {name}", disable=not progress, leave=False) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            read_idx_gz(tmp, IDX_SHA256[name])        # the content must be right before it gets the name
            os.replace(tmp, final)
            return final
        except (OSError, ValueError, http.client.HTTPException) as e:
            # URLError and timeouts are OSErrors, DataError a ValueError, a cut transfer an IncompleteRead
            failures.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataNotFoundError(f"could not download {name} into {folder}: " + "; ".join(failures))


def find_mnist(data_dir=None, download=True, mirrors=None, opener=None, progress=True):
    """The folder holding all four MNIST files, downloading missing ones if allowed.

    Returns
    -------
    str, the folder (see ``find_mnist_dir`` for which). Raises DataNotFoundError
    saying which files are missing and where to put them, DataFolderError when
    the folder is not a directory or cannot take a download.
    """
    folder, source, missing = find_mnist_dir(data_dir)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise DataFolderError(f"MNIST folder {folder} (from {source}) is not a directory")
    if not missing:
        return folder                     # only read from here on: a read-only copy is fine
    how = (f"copy {', '.join(missing)} into {folder} (from {source})"
           + ("" if data_dir is not None else f", or set {ENV_VAR} (or pass --data-dir) to a folder that holds all four"))
    if not download:
        raise DataNotFoundError(f"MNIST files missing from {folder} (from {source}): {', '.join(missing)}; {how}")
    check_writable(folder, source)       # one clear reason before any network traffic
    if progress:
        write(f"MNIST: downloading {len(missing)} file(s) into {folder} (from {source})", file=sys.stderr)
    for name in missing:
        try:
            download_file(name, folder, mirrors=mirrors, opener=opener, progress=progress)
        except DataFolderError:
            raise
        except DataNotFoundError as e:
            # every mirror failed for this file: the others would fail the same way, so stop here
            raise DataNotFoundError(f"MNIST files missing from {folder} and no mirror could be reached "
                                    f"(no network?): {', '.join(_missing(folder))}. To work offline, {how}. "
                                    f"Details: {e}") from None
    return folder


# ===== the dataset =====

@dataclass
class MNIST:
    """MNIST split into train / validation / test.

    Images are float32 in [0, 1] of shape (N, 1, 28, 28); labels are int64 (N,).
    The validation images are a fixed, seeded subset held out of the 60,000
    training images.
    """
    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    data_dir: str
    validation_seed: int


_raw_cache = {}   # (path, size, mtime) -> verified uint8 array: parse each file once per process


def _read_verified(path):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _raw_cache:
        name = os.path.basename(path)
        array = read_idx_gz(path, IDX_SHA256[name])
        if array.shape != EXPECTED_SHAPES[name] or array.dtype != np.uint8:
            raise DataError(f"{path}: expected uint8 data of shape {EXPECTED_SHAPES[name]}, "
                            f"got {array.dtype} of shape {array.shape}")
        array.flags.writeable = False
        _raw_cache[key] = array
    return _raw_cache[key]


def _images(raw):
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1]."""
    return (raw.astype(np.float32) / np.float32(255))[:, None, :, :]


def load_mnist(data_dir=None, validation=5000, seed=0, download=True, mirrors=None, opener=None, progress=True):
    """Load MNIST, verified, with a seeded validation split.

    Parameters
    ----------
    data_dir : folder with the four ``.gz`` files, or None for ``$SCRATCHNET_DATA``,
        else ``~/.cache/scratchnet/mnist`` (see ``find_mnist_dir``)
    validation : int, how many training images to hold out (0 <= validation < 60000)
    seed : int, picks which images are held out
    download : bool, fetch missing files from ``mirrors``
    mirrors, opener, progress : see ``download_file``

    Returns
    -------
    MNIST with train_x (60000 - validation, 1, 28, 28), val_x (validation, 1, 28, 28),
    test_x (10000, 1, 28, 28) float32 in [0, 1], and int64 labels.
    """
    if not 0 <= int(validation) < 60000:
        raise ValueError(f"validation must be an integer in [0, 60000), got {validation}")
    folder = find_mnist(data_dir, download=download, mirrors=mirrors, opener=opener, progress=progress)
    raw = {role: _read_verified(os.path.join(folder, name)) for role, name in FILES.items()}
    # Held-out indices are drawn by the seed; both parts keep the files' order.
    order = np.random.default_rng(seed).permutation(60000)
    val_idx, train_idx = np.sort(order[:validation]), np.sort(order[validation:])
    train_images, train_labels = raw["train_images"], raw["train_labels"].astype(np.int64)
    return MNIST(
        train_x=_images(train_images[train_idx]), train_y=train_labels[train_idx],
        val_x=_images(train_images[val_idx]), val_y=train_labels[val_idx],
        test_x=_images(raw["test_images"]), test_y=raw["test_labels"].astype(np.int64),
        data_dir=folder, validation_seed=seed,
    )
