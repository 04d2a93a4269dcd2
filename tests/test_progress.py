"""Progress: tqdm bars on a terminal; in a log, one line per epoch and a line now and then, never
the thousands of redraws a bar leaves in a file."""
import numpy as np

from scratchnet import progress, recipes, training


def _images(n=96, seed=0):
    """Random images and labels: the loop's output is under test, not what it learns."""
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 28, 28), dtype=np.float32), rng.integers(0, 10, n)


def test_training_into_a_log_prints_one_line_per_epoch_and_no_bar(capsys):
    x, y = _images()
    training.train(recipes.build_model("small", 0), x, y, epochs=2, batch_size=16, progress=True, desc="run")
    out, err = capsys.readouterr()             # not a terminal
    text = out + err
    assert "\r" not in text                    # no bar redraws
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 2, text
    assert lines[0].startswith("run epoch 1/2: loss ") and lines[1].startswith("run epoch 2/2: loss ")


def test_on_a_terminal_the_bars_are_tqdm(capsys, monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda stream=None: True)
    x, y = _images()
    training.train(recipes.build_model("small", 0), x, y, epochs=1, batch_size=16, progress=True, desc="run")
    out, err = capsys.readouterr()
    assert "\r" in err and "run epoch 1/1" in err and "batch" in err     # the bar, redrawn in place
    assert "run epoch 1/1: loss " in out


def test_quiet_training_prints_nothing(capsys):
    x, y = _images()
    training.train(recipes.build_model("small", 0), x, y, epochs=1, batch_size=16, progress=False)
    assert capsys.readouterr() == ("", "")


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_long_loop_in_a_log_prints_a_line_every_interval_and_one_at_the_end(capsys, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    bar = progress.tqdm(total=100, desc="JSMA", unit="img")
    assert isinstance(bar, progress.LogProgress)
    for step in range(10):
        clock.now += progress.LOG_EVERY / 4            # four updates per interval
        bar.update(10)
    bar.set_postfix(loss="0.25")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["JSMA: at 40/100 img (40 %), 01:00 elapsed",
                     "JSMA: at 80/100 img (80 %), 02:00 elapsed",
                     "JSMA: done 100/100 img (100 %), loss 0.25, 02:30 elapsed"]


def test_a_short_loop_in_a_log_stays_silent(capsys, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    seen = []
    for item in progress.tqdm(range(5), desc="FGSM"):
        clock.now += 1.0
        seen.append(item)
    assert seen == [0, 1, 2, 3, 4]
    assert capsys.readouterr() == ("", "")
