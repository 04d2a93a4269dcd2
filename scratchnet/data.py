"""MNIST: find, download, verify and parse the four IDX files.

The four standard files (gzip-compressed IDX) are looked for in this order:

1. the ``data_dir`` argument (``--data-dir`` on the command line): when given,
   only this folder is used;
2. the folder named by the environment variable ``SCRATCHNET_DATA``;
3. the user cache ``~/.cache/scratchnet/mnist``.

Where files are missing they are downloaded (when ``download=True``) into the
first of those folders that is set, from the mirrors in ``MIRRORS`` in turn.
A download goes to a temporary name in the target folder and is moved into
place only after its content has been checked, so a half-downloaded file never
sits under the final name.

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
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

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

def candidate_dirs(data_dir=None):
    """The folders to look in, in order (see the module docstring)."""
    if data_dir is not None:
        return [os.path.expanduser(os.fspath(data_dir))]
    dirs = []
    if os.environ.get(ENV_VAR):
        dirs.append(os.path.expanduser(os.environ[ENV_VAR]))
    dirs.append(os.path.expanduser(DEFAULT_DIR))
    return dirs


def _missing(folder):
    return [f for f in FILES.values() if not os.path.isfile(os.path.join(folder, f))]


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
    the final path. Raises DataNotFoundError listing every mirror's failure.
    """
    mirrors = MIRRORS if mirrors is None else mirrors
    opener = opener or (lambda url: urllib.request.urlopen(url, timeout=30))
    os.makedirs(folder, exist_ok=True)
    final = os.path.join(folder, name)
    failures = []
    for base in mirrors:
        url = base.rstrip("/") + "/" + name
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
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
    str, the folder. Raises DataNotFoundError with a message saying which files
    are missing and where to put them.
    """
    dirs = candidate_dirs(data_dir)
    for folder in dirs:
        if not _missing(folder):
            return folder
    target = dirs[0]
    missing = _missing(target)
    how = (f"copy {', '.join(missing)} into {target}"
           + ("" if data_dir is not None else f", or set {ENV_VAR} (or pass --data-dir) to a folder that holds all four"))
    if not download:
        raise DataNotFoundError(f"MNIST files missing from {target}: {', '.join(missing)}; {how}")
    for name in missing:
        try:
            download_file(name, target, mirrors=mirrors, opener=opener, progress=progress)
        except DataNotFoundError as e:
            # every mirror failed for this file: the others would fail the same way, so stop here
            raise DataNotFoundError(f"MNIST files missing from {target} and no mirror could be reached "
                                    f"(no network?): {', '.join(_missing(target))}. To work offline, {how}. "
                                    f"Details: {e}") from None
    return target


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
    data_dir : folder with the four ``.gz`` files, or None to look in
        ``$SCRATCHNET_DATA`` then ``~/.cache/scratchnet/mnist``
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
