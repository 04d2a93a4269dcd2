"""The one atomic writer: permissions under the umask, nothing left on failure, stale
temporaries cleared, and the one JSON convention for non-finite floats; the checks a folder
passes before a run (writable, enough room), a failed write naming its file, and the lock."""
import errno
import json
import math
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from scratchnet import files
from scratchnet.model import papernot_mnist, save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


# ===== before a run: can the folder take it? =====

def test_a_folder_under_a_regular_file_is_refused_with_its_path_and_reason(tmp_path):
    (tmp_path / "plain").write_text("a file, not a folder")
    folder = tmp_path / "plain" / "cache"
    with pytest.raises(files.WriteError) as info:
        files.check_writable(folder, "the model cache folder")
    message = str(info.value)
    assert message == f"the model cache folder {folder} is not writable: Not a directory"
    assert info.value.errno == errno.ENOTDIR


def test_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    """As root, permission bits do not stop a write: the read-only file system is simulated
    where the probe file is created."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(files.WriteError, match=f"--out {tmp_path} is not writable: Read-only file system"):
        files.check_writable(tmp_path, "--out")


def test_a_writable_folder_is_created_and_left_clean(tmp_path):
    folder = tmp_path / "new" / "cache"
    assert files.check_writable(folder) == str(folder)
    assert folder.is_dir() and os.listdir(folder) == []


def test_too_little_free_space_is_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil_usage(free=3_000_000))
    files.check_free_space(tmp_path, 2_000_000)
    with pytest.raises(files.WriteError, match=r"has 3.0 MB free; this run needs about 5.0 MB"):
        files.check_free_space(tmp_path, 5_000_000, "the checkpoint folder")


def shutil_usage(free):
    import shutil
    return shutil._ntuple_diskusage(total=10 * free, used=9 * free, free=free)


def test_a_write_the_kernel_refuses_names_the_file_and_the_reason(tmp_path):
    """A real failing write: a child process whose files may not exceed 1,000 bytes
    (RLIMIT_FSIZE, the kernel's EFBIG), writing a larger JSON over a good one."""
    target = tmp_path / "result.json"
    files.write_json(target, {"good": 1})
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"   # EFBIG as an error, not a killing signal
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))\n"
        "from scratchnet import files\n"
        "try:\n"
        "    files.write_json(sys.argv[1], {'values': list(range(2000))})\n"
        "except files.WriteError as e:\n"
        "    print(e, e.errno)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"could not write {target}: File too large {errno.EFBIG}"
    assert files.read_json(target) == {"good": 1}               # the last good file is kept
    assert sorted(os.listdir(tmp_path)) == ["result.json"]       # and no temporary is left


# ===== taking turns: the lock =====

HOLD = (
    "import os, sys, time\n"
    "from scratchnet.files import exclusive_lock\n"
    "with exclusive_lock(sys.argv[1]):\n"
    "    open(sys.argv[2], 'w').close()\n"                      # 'I hold it'
    "    while not os.path.exists(sys.argv[3]):\n"
    "        time.sleep(0.02)\n"
)


def _holder(tmp_path):
    """A child process holding tmp_path/x.lock until tmp_path/release exists."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    held = tmp_path / "held"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "x.lock"), str(held),
                              str(tmp_path / "release")], env=env)
    deadline = time.monotonic() + 120
    while not held.exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child never took the lock"
        time.sleep(0.02)
    return child


def test_a_second_process_waits_for_the_lock_and_is_told_whose_it_is(tmp_path):
    child = _holder(tmp_path)
    waited_for, acquired = [], threading.Event()

    def take():
        with files.exclusive_lock(tmp_path / "x.lock", on_wait=waited_for.append):
            acquired.set()
    thread = threading.Thread(target=take)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not waited_for and time.monotonic() < deadline:
            time.sleep(0.02)
        assert waited_for == [child.pid] and not acquired.is_set()
    finally:
        (tmp_path / "release").touch()
        child.wait(timeout=60)
        thread.join(timeout=60)
    assert acquired.is_set() and waited_for == [child.pid]
    assert not (tmp_path / "x.lock").exists()                    # removed by its last holder


def test_a_lock_left_by_a_killed_process_is_taken_over_at_once(tmp_path):
    child = _holder(tmp_path)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert (tmp_path / "x.lock").read_text().strip() == str(child.pid)   # stale: its holder is dead
    waited_for = []
    with files.exclusive_lock(tmp_path / "x.lock", on_wait=waited_for.append):
        assert (tmp_path / "x.lock").read_text().strip() == str(os.getpid())
    assert waited_for == []


def test_a_file_system_without_locks_runs_the_block_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(files.fcntl, "flock", no_locks)
    ran = []
    with pytest.warns(UserWarning, match="cannot lock .*x.lock \\(No locks available\\)"):
        with files.exclusive_lock(tmp_path / "x.lock"):
            ran.append(True)
    assert ran == [True]
