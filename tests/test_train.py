"""The training loop, the three recipes and the model cache, on a few thousand real MNIST images.

The recipe tests use the small network (``architecture="small"``): they are
about the recipes, not the architecture, and it trains in seconds.
"""
import errno
import math
import os

import numpy as np
import pytest

from scratchnet import cache as C
from scratchnet import checkpoint as CK
from scratchnet import recipes
from scratchnet import training
from scratchnet.data import MNIST, load_mnist
from scratchnet.layers import Dense, Flatten
from scratchnet.model import Sequential, load

from conftest import mnist_dir, needs_mnist

pytestmark = needs_mnist

# A short run: the small network, 3,000 training images, 3 epochs, Adam at lr 1e-2.
SHORT = dict(epochs=3, lr=1e-2, progress=False)
SHORT_RUN_MIN_ACCURACY = 0.85     # measured about 0.88 on the first 2,000 test images
MARGIN_FACTOR_T20 = 5.0           # measured about 16x: the T = 20 logits margin over the T = 1 one


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(mnist_dir(), validation=5000, download=False)


@pytest.fixture(scope="module")
def small(mnist):
    """3,000 training, 500 validation and 2,000 test images."""
    return MNIST(mnist.train_x[:3000], mnist.train_y[:3000], mnist.val_x[:500], mnist.val_y[:500],
                 mnist.test_x[:2000], mnist.test_y[:2000], mnist.data_dir, mnist.validation_seed)


@pytest.fixture(scope="module")
def trained(small):
    """The small network trained for a short run at T = 1 and at T = 20 (same seed)."""
    models = {}
    for T in (1.0, 20.0):
        model = recipes.build_model("small", seed=0)
        training.train(model, small.train_x, small.train_y, T=T, seed=0, **SHORT)
        models[T] = model
    return models


# ===== schedule and loss =====

def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    lrs = [training.learning_rate(s, 100, 1.0, 10) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))          # decays monotonically
    assert lrs[10] == 1.0 and lrs[-1] < 1e-3


def test_training_step_uses_softmax_of_z_over_T():
    """One SGD step on a linear model with known logits: the update is exactly what
    the loss of softmax(z / T) prescribes, and not what softmax(z) would."""
    T, lr = 5.0, 0.1
    x = np.array([[[[1.0, 0.0], [0.0, 2.0]]], [[[0.0, 1.0], [1.0, 0.0]]]])      # (2, 1, 2, 2)
    y = np.array([0, 2])
    W = np.array([[3.0, -1.0, 0.5], [0.0, 2.0, -2.0], [1.0, 1.0, 1.0], [-3.0, 0.0, 4.0]])

    def model():
        dense = Dense(4, 3, dtype=np.float64, name="dense")
        dense.params["W"], dense.params["b"] = W.copy(), np.zeros(3)
        return Sequential([Flatten(name="flatten"), dense])

    z = x.reshape(2, 4) @ W                                     # the known logits
    onehot = np.eye(3)[y]

    def expected_update(temperature):
        s = z / temperature
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        dz = (p - onehot) / (temperature * len(y))              # d(mean CE of softmax(z / T)) / dz
        # SGD's rate is multiplied by T (make_optimizer), so the step is -lr * T * x^T dz
        return -lr * T * x.reshape(2, 4).T @ dz

    m = model()
    training.train(m, x, y, T=T, epochs=1, batch_size=2, optimizer="sgd", lr=lr, warmup_steps=1, progress=False)
    update = m["dense.W"] - W
    np.testing.assert_allclose(update, expected_update(T), rtol=1e-12)
    assert not np.allclose(update, expected_update(1.0), rtol=1e-3)

    # and the loss value itself is the cross-entropy of softmax(z / T)
    loss, _ = training.softmax_cross_entropy(z, y, T)
    s = z / T
    by_hand = -np.mean(s[np.arange(2), y] - np.log(np.exp(s).sum(1)))
    assert math.isclose(loss, by_hand, rel_tol=1e-12)


# ===== short runs =====

def test_short_run_reaches_the_stated_accuracy(trained, small):
    acc = training.accuracy(trained[1.0], small.test_x, small.test_y)
    assert acc >= SHORT_RUN_MIN_ACCURACY, f"short T = 1 run: test accuracy {acc:.3f}"


def test_temperature_run_learns_logit_margins_several_times_larger(trained, small):
    """Trained at T = 20, the network makes softmax(z / 20) confident, so its logits
    (and their margins) grow far beyond a T = 1 network's; at T = 1 it saturates."""
    z1 = training.logits_in_batches(trained[1.0], small.test_x)
    z20 = training.logits_in_batches(trained[20.0], small.test_x)
    m1, m20 = training.logit_margins(z1).mean(), training.logit_margins(z20).mean()
    assert m20 >= MARGIN_FACTOR_T20 * m1, f"margin T=20 {m20:.2f} vs T=1 {m1:.2f}"
    sat1 = training.evaluate(trained[1.0], small.test_x, small.test_y)["saturated_fraction"]
    sat20 = training.evaluate(trained[20.0], small.test_x, small.test_y)["saturated_fraction"]
    assert sat20 > 0.3 and sat20 > sat1 + 0.3, (sat1, sat20)
    assert training.accuracy(trained[20.0], small.test_x, small.test_y) >= 0.8


def test_distillation_targets_are_the_teachers_probabilities_at_T(trained, small):
    teacher, T = trained[20.0], 20.0
    x = small.train_x[:300]
    targets = recipes.distillation_targets(teacher, x, T)
    z = training.logits_in_batches(teacher, x).astype(np.float64)
    s = z / T
    by_hand = np.exp(s - s.max(1, keepdims=True))
    by_hand /= by_hand.sum(1, keepdims=True)
    assert targets.shape == (300, 10) and targets.dtype == np.float32
    np.testing.assert_allclose(targets, by_hand, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(targets.sum(1), 1.0, rtol=1e-5)
    assert targets.max(1).mean() < 0.999        # soft labels, unlike the saturated softmax at T = 1


def test_distilled_recipe_trains_the_student_at_T_on_those_targets(trained, small, monkeypatch):
    calls = []
    real_train = training.train

    def recording_train(model, x, y, T=1.0, **kw):
        calls.append((x, y, T))
        return real_train(model, x, y, T=T, **kw)

    monkeypatch.setattr(training, "train", recording_train)
    teacher = trained[20.0]
    student, meta = recipes.train_distilled(small, 20.0, teacher, seed=0, epochs=1, architecture="small",
                                      train_size=500, progress=False, lr=1e-2)
    (x, y, T), = calls
    assert T == 20.0 and y.shape == (500, 10)
    np.testing.assert_array_equal(y, recipes.distillation_targets(teacher, small.train_x[:500], 20.0))
    assert meta["recipe"] == "distilled" and meta["T"] == 20.0 and meta["deploy_T"] == 1.0
    assert student is not teacher


# ===== reproducibility and resuming =====

def _one_epoch_model(small, seed, **kw):
    model = recipes.build_model("small", seed=seed)
    training.train(model, small.train_x[:1000], small.train_y[:1000], T=2.0, seed=seed, epochs=1,
            lr=1e-2, progress=False, **kw)
    return model


def test_same_seed_gives_the_same_weights(small):
    a, b, c = _one_epoch_model(small, 1), _one_epoch_model(small, 1), _one_epoch_model(small, 2)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])
    assert any(not np.array_equal(a.params[n], c.params[n]) for n in a.params)


def test_interrupted_run_resumes_to_the_same_weights(small, tmp_path, monkeypatch):
    x, y = small.train_x[:1000], small.train_y[:1000]
    settings = dict(T=2.0, seed=3, epochs=2, lr=1e-2, progress=False)
    straight = recipes.build_model("small", seed=3)
    training.train(straight, x, y, **settings)

    checkpoint = str(tmp_path / "run.ckpt.npz")
    real_save = CK.save_checkpoint

    def save_then_die(path, model, opt, epoch, history, s):
        real_save(path, model, opt, epoch, history, s)
        raise KeyboardInterrupt                              # killed right after epoch 1
    monkeypatch.setattr(CK, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        training.train(recipes.build_model("small", seed=3), x, y, checkpoint=checkpoint, **settings)
    monkeypatch.setattr(CK, "save_checkpoint", real_save)

    resumed = recipes.build_model("small", seed=3)
    history = training.train(resumed, x, y, checkpoint=checkpoint, **settings)
    assert [h["epoch"] for h in history] == [1, 2]
    for name in straight.params:
        np.testing.assert_array_equal(resumed.params[name], straight.params[name])


def test_checkpoint_from_other_settings_is_ignored(small, tmp_path):
    x, y = small.train_x[:500], small.train_y[:500]
    checkpoint = str(tmp_path / "c.npz")
    training.train(recipes.build_model("small", 0), x, y, T=1.0, epochs=1, lr=1e-2, progress=False, checkpoint=checkpoint)
    fresh = recipes.build_model("small", 0)
    history = training.train(fresh, x, y, T=5.0, epochs=1, lr=1e-2, progress=False, checkpoint=checkpoint)
    assert [h["epoch"] for h in history] == [1]                 # trained, not resumed
    reference = recipes.build_model("small", 0)
    training.train(reference, x, y, T=5.0, epochs=1, lr=1e-2, progress=False)
    np.testing.assert_array_equal(fresh["dense2.W"], reference["dense2.W"])


def test_sgd_with_learning_rate_scaled_by_T_learns_at_T_20(small):
    model = recipes.build_model("small", seed=0)
    training.train(model, small.train_x[:2000], small.train_y[:2000], T=20.0, epochs=2, optimizer="sgd",
            lr=0.05, progress=False)
    # measured 0.77 after these 2 epochs; unscaled SGD at this rate would see steps 20 times smaller
    assert training.accuracy(model, small.test_x[:1000], small.test_y[:1000]) >= 0.7


def test_bad_training_arguments_are_value_errors(small):
    model = recipes.build_model("small", 0)
    x, y = small.train_x[:10], small.train_y[:10]
    with pytest.raises(ValueError, match="T must be"):
        training.train(model, x, y, T=0.0, progress=False)
    with pytest.raises(ValueError, match="same length"):
        training.train(model, x, y[:5], progress=False)
    with pytest.raises(ValueError, match="unknown optimizer"):
        training.train(model, x, y, optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="unknown architecture"):
        recipes.build_model("resnet")


# ===== the cache =====

def _tiny(small):
    """400 training, 200 validation, 300 test images: for cache mechanics only."""
    return MNIST(small.train_x[:400], small.train_y[:400], small.val_x[:200], small.val_y[:200],
                 small.test_x[:300], small.test_y[:300], small.data_dir, small.validation_seed)


TINY = dict(epochs=1, architecture="small", lr=1e-2, progress=False)


def test_cache_trains_once_then_loads_and_force_retrains(small, tmp_path, monkeypatch):
    data = _tiny(small)
    model, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert os.path.isfile(meta["path"]) and os.path.dirname(meta["path"]) == str(tmp_path)
    saved, saved_meta = load(meta["path"])
    for key in ("recipe", "T", "seed", "epochs", "test_accuracy", "val_accuracy"):
        assert saved_meta[key] == meta[key]
    assert saved_meta["recipe"] == "standard" and saved_meta["T"] == 1.0 and saved_meta["epochs"] == 1
    assert 0 < saved_meta["test_accuracy"] <= 1 and 0 < saved_meta["val_accuracy"] <= 1
    assert saved_meta["train_seconds"] == sum(h["seconds"] for h in saved_meta["history"])

    def no_training(*args, **kw):
        raise AssertionError("the cached model should have been reused")
    monkeypatch.setattr(training, "train", no_training)
    again, meta2 = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    np.testing.assert_array_equal(again["dense2.W"], model["dense2.W"])
    with pytest.raises(AssertionError, match="reused"):
        C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, force=True, **TINY)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(meta["path"])]   # no temporary files


def test_cache_key_covers_recipe_T_seed_and_settings():
    settings = {"architecture": "papernot", "batch_size": 128, "optimizer": "adam", "lr": None,
                "warmup_steps": None, "train_size": None, "validation": 5000, "validation_seed": 0}
    base = C.model_key("temperature", 20, 0, 5, settings)
    assert base.startswith("temperature-T20-seed0-ep5-papernot-")
    others = {C.model_key("distilled", 20, 0, 5, settings), C.model_key("temperature", 100, 0, 5, settings),
              C.model_key("temperature", 20, 1, 5, settings), C.model_key("temperature", 20, 0, 6, settings),
              C.model_key("temperature", 20, 0, 5, {**settings, "lr": 1e-2}),
              C.model_key("temperature", 20, 0, 5, {**settings, "train_size": 1000})}
    assert base not in others and len(others) == 6
    assert C.model_key("temperature", 20, 0, 5, dict(settings)) == base


def test_distilled_fetches_its_teacher_through_the_cache(small, tmp_path, monkeypatch):
    data = _tiny(small)
    student, meta = C.get_model("distilled", 5.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("distilled-T5-") and files[1].startswith("temperature-T5-")
    assert meta["teacher"]["key"] == files[1] and meta["teacher"]["recipe"] == "temperature"

    def no_training(*args, **kw):
        raise AssertionError("the teacher should come from the cache")
    monkeypatch.setattr(training, "train", no_training)
    teacher, teacher_meta = C.get_model("temperature", 5.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert teacher_meta["recipe"] == "temperature" and teacher_meta["T"] == 5.0


def test_nan_loss_stops_training_and_keeps_the_good_cached_model(small, tmp_path):
    data = _tiny(small)
    _, meta = C.get_model("temperature", 2.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    before = open(meta["path"], "rb").read()
    poisoned = MNIST(data.train_x.copy(), data.train_y, data.val_x, data.val_y, data.test_x, data.test_y,
                     data.data_dir, data.validation_seed)
    poisoned.train_x[:] = np.nan
    with pytest.raises(training.TrainingDivergedError, match=r"loss became nan at epoch 1, batch 1"):
        C.get_model("temperature", 2.0, seed=0, data=poisoned, cache_dir=tmp_path, force=True, **TINY)
    assert open(meta["path"], "rb").read() == before
    assert os.listdir(tmp_path) == [os.path.basename(meta["path"])]


def test_unreadable_cached_model_is_retrained_with_a_warning(small, tmp_path):
    data = _tiny(small)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    with open(meta["path"], "wb") as f:
        f.write(b"half a file")
    with pytest.warns(UserWarning, match="unreadable cached model"):
        model, meta2 = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    load(meta2["path"])                                        # a complete model again


def test_bad_recipe_and_temperature_are_value_errors():
    with pytest.raises(ValueError, match="unknown recipe 'annealed'"):
        C.get_model("annealed", 1.0)
    with pytest.raises(ValueError, match="T must be a finite number > 0"):
        C.get_model("temperature", -3)
    with pytest.raises(ValueError, match="standard recipe trains at T = 1"):
        C.get_model("standard", 20)


def test_recipe_without_validation_images_records_none(small, tmp_path):
    data = _tiny(small)
    data = MNIST(data.train_x, data.train_y, data.val_x[:0], data.val_y[:0], data.test_x, data.test_y,
                 data.data_dir, data.validation_seed)
    model, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert meta["val_accuracy"] is None and "val_accuracy" not in meta["history"][0]
    assert meta["test_accuracy"] > 0.1


def test_opening_the_cache_removes_a_killed_saves_temporary_and_never_reads_it(small, tmp_path, monkeypatch):
    from scratchnet import files
    data = _tiny(small)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    stale = tmp_path / ".tmp-k1ll3d.npz"                 # what a save killed before its rename leaves
    stale.write_bytes(b"half a model")
    old = files.PROCESS_START - 3600
    os.utime(stale, (old, old))
    read = []
    real_load = C.load
    monkeypatch.setattr(C, "load", lambda path, **kw: read.append(os.path.basename(path)) or real_load(path, **kw))
    C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert read == [os.path.basename(meta["path"])]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(meta["path"])]


def test_the_training_version_is_in_the_key_and_an_older_entry_is_retrained(small, tmp_path, monkeypatch):
    settings = {"architecture": "small", "batch_size": 128, "optimizer": "adam", "lr": None,
                "warmup_steps": None, "train_size": None, "validation": 5000, "validation_seed": 0}
    key = C.model_key("standard", 1, 0, 5, settings)
    monkeypatch.setattr(recipes, "TRAINING_VERSION", recipes.TRAINING_VERSION + 1)
    assert C.model_key("standard", 1, 0, 5, settings) != key
    monkeypatch.undo()

    data = _tiny(small)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert meta["training_version"] == recipes.TRAINING_VERSION
    model, _ = load(meta["path"])
    assert meta["cpu_threads"] == training.cpu_threads(model) >= 1      # the weights depend on it
    # an entry under the current name whose metadata says an older training code made it
    model, saved = load(meta["path"])
    saved["training_version"] = recipes.TRAINING_VERSION - 1
    saved["marker"] = "old"
    from scratchnet.model import save
    save(model, meta["path"], saved)
    with pytest.warns(UserWarning, match="training version"):
        _, again = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert "marker" not in again and again["training_version"] == recipes.TRAINING_VERSION
    assert "marker" not in load(meta["path"])[1]


# ===== long runs: nothing silent, nothing lost, nothing done twice =====

def _entry(data, tmp_path, recipe="standard", T=1.0, epochs=1):
    """The cache's file names for the TINY settings: (model path, checkpoint path)."""
    settings = {"architecture": "small", "batch_size": 128, "optimizer": "adam", "lr": 1e-2,
                "warmup_steps": None, "train_size": None, "validation": len(data.val_x),
                "validation_seed": data.validation_seed}
    key = C.model_key(recipe, T, 0, epochs, settings)
    return str(tmp_path / (key + ".npz")), str(tmp_path / (key + ".ckpt.npz"))


def _count_epochs(monkeypatch):
    """A list that grows by one for every epoch really trained (not resumed)."""
    epochs = []
    real = CK.save_checkpoint

    def counting(path, model, opt, epoch, history, settings):
        epochs.append(epoch)
        return real(path, model, opt, epoch, history, settings)
    monkeypatch.setattr(CK, "save_checkpoint", counting)
    return epochs


def test_a_cache_folder_that_cannot_take_files_fails_before_training(small, tmp_path, monkeypatch):
    (tmp_path / "plain").write_text("a file, not a folder")
    folder = tmp_path / "plain" / "models"

    def no_training(*args, **kwargs):
        raise AssertionError("trained before the cache folder was checked")
    monkeypatch.setattr(recipes, "train_recipe", no_training)
    with pytest.raises(OSError, match=f"the model cache folder {folder} is not writable: Not a directory"):
        C.get_model("standard", 1.0, seed=0, data=_tiny(small), cache_dir=folder, **TINY)


def test_too_little_room_for_the_checkpoints_fails_before_the_first_epoch(small, tmp_path, monkeypatch):
    from scratchnet import files
    import shutil
    monkeypatch.setattr(files.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(total=10**9, used=10**9 - 10**5, free=10**5))
    trained = _count_epochs(monkeypatch)
    with pytest.raises(OSError, match=r"has 0.1 MB free; this run needs about [0-9.]+ MB"):
        C.get_model("standard", 1.0, seed=0, data=_tiny(small), cache_dir=tmp_path, **TINY)
    assert trained == [] and os.listdir(tmp_path) == []


def _disk_full_for(monkeypatch, module):
    """From now on, every write through ``module.save_npz_atomic`` fails inside the atomic
    writer as on a full disk (ENOSPC while the bytes go out)."""
    from scratchnet import files

    def no_space(f, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def full(path, arrays):
        with pytest.MonkeyPatch.context() as m:
            m.setattr(files.np, "savez", no_space)
            files.save_npz_atomic(path, arrays)
    monkeypatch.setattr(module, "save_npz_atomic", full)


def test_a_full_disk_at_a_checkpoint_names_it_keeps_the_last_good_one_and_the_rerun_resumes(
        small, tmp_path, monkeypatch):
    data = _tiny(small)
    run = dict(TINY, epochs=2)
    model_path, checkpoint = _entry(data, tmp_path, epochs=2)
    trained = _count_epochs(monkeypatch)
    real_save = CK.save_checkpoint

    def full_after_epoch_1(path, model, opt, epoch, history, settings):
        if epoch == 2:
            _disk_full_for(monkeypatch, CK)                   # the disk fills up during epoch 2
        return real_save(path, model, opt, epoch, history, settings)
    monkeypatch.setattr(CK, "save_checkpoint", full_after_epoch_1)
    with pytest.raises(OSError) as info:
        C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **run)
    assert str(info.value) == f"could not write {checkpoint}: No space left on device"
    assert info.value.errno == errno.ENOSPC
    assert CK.read_progress(checkpoint) == 1                     # epoch 1's checkpoint, whole
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(checkpoint)]   # no model, no temporary, no lock

    monkeypatch.undo()
    trained = _count_epochs(monkeypatch)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **run)
    assert trained == [2]                                        # epoch 1 was not trained again
    assert [h["epoch"] for h in meta["history"]] == [1, 2]
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(model_path)]


def test_a_model_that_cannot_be_saved_keeps_its_weights_in_the_checkpoint(small, tmp_path, monkeypatch):
    data = _tiny(small)
    model_path, checkpoint = _entry(data, tmp_path)
    import scratchnet.model
    _disk_full_for(monkeypatch, scratchnet.model)     # the model's write fails, the checkpoints' do not
    with pytest.raises(OSError) as info:
        C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    message = str(info.value)
    assert message.startswith(f"could not write {model_path}: No space left on device. "
                              f"The trained weights are kept in {checkpoint}")
    assert os.listdir(tmp_path) == [os.path.basename(checkpoint)] and CK.read_progress(checkpoint) == 1

    monkeypatch.undo()
    trained = _count_epochs(monkeypatch)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert trained == [] and meta["path"] == model_path          # saved without retraining
    assert os.listdir(tmp_path) == [os.path.basename(model_path)]


def test_a_run_that_diverges_in_a_later_epoch_leaves_nothing(small, tmp_path, monkeypatch):
    data = _tiny(small)
    real = training.softmax_cross_entropy
    calls = []

    def nan_in_epoch_2(z, y, T):
        calls.append(1)
        loss, dz = real(z, y, T)
        return (math.nan if len(calls) > 4 else loss), dz       # 400 images: 4 batches an epoch
    monkeypatch.setattr(training, "softmax_cross_entropy", nan_in_epoch_2)
    with pytest.raises(training.TrainingDivergedError, match=r"loss became nan at epoch 2, batch 1.*nothing was cached"):
        C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **dict(TINY, epochs=2))
    assert os.listdir(tmp_path) == []                            # no model, no checkpoint to resume into NaN


def test_a_damaged_checkpoint_is_reported_and_never_read(small, tmp_path):
    data = _tiny(small)
    _, checkpoint = _entry(data, tmp_path)
    with open(checkpoint, "wb") as f:
        f.write(b"PK\x03\x04 half a checkpoint")
    with pytest.warns(UserWarning, match=f"ignoring unreadable checkpoint {checkpoint}"):
        _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    assert [h["epoch"] for h in meta["history"]] == [1] and not os.path.exists(checkpoint)


def test_an_interrupted_distilled_run_resumes_its_student_and_reuses_its_teacher(
        small, tmp_path, monkeypatch, capsys):
    data = _tiny(small)
    run = dict(TINY, epochs=2, progress=True)
    real_save = CK.save_checkpoint
    students = []

    def ctrl_c_after_the_students_first_epoch(path, model, opt, epoch, history, settings):
        real_save(path, model, opt, epoch, history, settings)
        if os.path.basename(path).startswith("distilled-"):
            students.append(epoch)
            raise KeyboardInterrupt
    monkeypatch.setattr(CK, "save_checkpoint", ctrl_c_after_the_students_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        C.get_model("distilled", 5.0, seed=0, data=data, cache_dir=tmp_path, **run)
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 2 and names[0].startswith("distilled-") and names[0].endswith(".ckpt.npz")
    assert names[1].startswith("temperature-T5-") and not names[1].endswith(".ckpt.npz")   # the finished teacher

    monkeypatch.undo()
    capsys.readouterr()
    trained = _count_epochs(monkeypatch)
    _, meta = C.get_model("distilled", 5.0, seed=0, data=data, cache_dir=tmp_path, **run)
    out = capsys.readouterr().out
    assert trained == [2]                          # the teacher was read, the student's epoch 1 kept
    assert "resuming from" in out and "after epoch 1 of 2" in out
    assert [h["epoch"] for h in meta["history"]] == [1, 2]


KILLED_RUN = """
import os, sys, time
from scratchnet import cache, checkpoint
from scratchnet.data import MNIST, load_mnist
real = checkpoint.save_checkpoint

def save_then_hang(path, *args):
    real(path, *args)
    open(sys.argv[2], "w").close()     # epoch 1 is saved: the parent may kill us now
    time.sleep(600)
checkpoint.save_checkpoint = save_then_hang
d = load_mnist(sys.argv[3], validation=5000, download=False, progress=False)
data = MNIST(d.train_x[:400], d.train_y[:400], d.val_x[:200], d.val_y[:200], d.test_x[:300], d.test_y[:300],
             d.data_dir, d.validation_seed)
cache.get_model("standard", 1.0, seed=0, epochs=2, architecture="small", lr=1e-2, data=data,
                cache_dir=sys.argv[1], progress=False)
"""


def test_a_killed_run_resumes_and_its_lock_is_taken_over(small, tmp_path, monkeypatch, capsys):
    """kill -9 right after epoch 1's checkpoint: the rerun resumes from it, does not wait for the
    dead process's lock, and trains only epoch 2."""
    import signal
    import subprocess
    import sys
    import time
    saved = tmp_path / "saved"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN, str(tmp_path / "models"), str(saved), mnist_dir()],
                             env=env)
    try:
        deadline = time.monotonic() + 300
        while not saved.exists():
            assert child.poll() is None and time.monotonic() < deadline, "the run never reached its checkpoint"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    left = sorted(os.listdir(tmp_path / "models"))
    key = left[0].split(".")[0]
    assert left == [key + ".ckpt.npz", key + ".lock"]         # epoch 1 kept; the dead process's lock

    data = _tiny(small)
    trained = _count_epochs(monkeypatch)
    _, meta = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path / "models",
                          **dict(TINY, epochs=2))
    assert trained == [2] and "waiting for" not in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path / "models")) == [os.path.basename(meta["path"])]


def test_two_requests_for_one_model_train_it_once(small, tmp_path, monkeypatch, capsys):
    """Two threads ask for the same model: one trains, the other says whom it waits for and reads it."""
    import threading
    data = _tiny(small)
    real_train = recipes.train_recipe
    started, waiting = threading.Event(), threading.Event()
    trainings = []

    def train_slowly(*args, **kwargs):
        trainings.append(threading.current_thread().name)
        started.set()
        assert waiting.wait(timeout=120), "the second request never waited"
        return real_train(*args, **kwargs)
    monkeypatch.setattr(recipes, "train_recipe", train_slowly)
    real_say = C.say_waiting
    monkeypatch.setattr(C, "say_waiting", lambda key, pid: (real_say(key, pid), waiting.set()))

    results = {}

    def ask(name):
        results[name] = C.get_model("standard", 1.0, seed=0, data=data, cache_dir=tmp_path, **TINY)
    first = threading.Thread(target=ask, args=("first",), name="first")
    first.start()
    assert started.wait(timeout=120)
    second = threading.Thread(target=ask, args=("second",), name="second")
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)

    assert trainings == ["first"]
    (model_a, meta_a), (model_b, meta_b) = results["first"], results["second"]
    assert meta_a["path"] == meta_b["path"]
    np.testing.assert_array_equal(model_a["dense2.W"], model_b["dense2.W"])
    err = capsys.readouterr().err
    assert err.count("waiting for") == 1 and f"waiting for PID {os.getpid()}, which is training" in err
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(meta_a["path"])]     # the lock is gone
