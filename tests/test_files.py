"""The one atomic writer: permissions under the umask, nothing left on failure, stale
temporaries cleared, and the one JSON convention for non-finite floats."""
import json
import math
import os
import stat

import numpy as np
import pytest

from scratchnet import files
from scratchnet.model import papernot_mnist, save


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_saved_files_honour_the_umask(tmp_path, umask_022):
    save(papernot_mnist(seed=0), tmp_path / "m.npz")
    files.write_json(tmp_path / "r.json", {"a": 1})
    with files.atomic_write(tmp_path / "t.csv", "w") as f:
        f.write("x\n")
    for name in ("m.npz", "r.json", "t.csv"):
        assert mode(tmp_path / name) == 0o644, (name, oct(mode(tmp_path / name)))
    old = os.umask(0o077)
    try:
        files.write_json(tmp_path / "private.json", {})
    finally:
        os.umask(old)
    assert mode(tmp_path / "private.json") == 0o600


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "r.json"
    files.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError, match="boom"):
        with files.atomic_write(path, "w") as f:
            f.write("{half")
            raise RuntimeError("boom")
    assert json.loads(path.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def test_stale_temporaries_are_removed_and_fresh_ones_kept(tmp_path):
    stale = tmp_path / ".tmp-abc123.npz"
    stale.write_bytes(b"half a model")
    old = files.PROCESS_START - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".tmp-def456.npz"           # written now, e.g. by another running process
    fresh.write_bytes(b"being written")
    keep = tmp_path / "model.npz"
    keep.write_bytes(b"a model")
    os.utime(keep, (old, old))
    assert files.remove_stale_temporaries(tmp_path) == [".tmp-abc123.npz"]
    assert sorted(os.listdir(tmp_path)) == [".tmp-def456.npz", "model.npz"]


def test_json_spells_non_finite_floats_one_way_and_reads_them_back(tmp_path):
    obj = {"zero_gradient": -math.inf, "big": math.inf, "rate": math.nan, "x": np.float32(0.5),
           "arr": np.array([1.0, -np.inf])}
    files.write_json(tmp_path / "r.json", obj)
    text = (tmp_path / "r.json").read_text()
    assert '"-inf"' in text and '"inf"' in text and '"nan"' in text and "NaN" not in text
    back = files.read_json(tmp_path / "r.json")
    assert back["zero_gradient"] == -math.inf and back["big"] == math.inf and math.isnan(back["rate"])
    assert back["x"] == 0.5 and back["arr"] == [1.0, -math.inf]
