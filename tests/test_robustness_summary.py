"""The per-seed summary of robustness_vs_T.py's worst case, on made-up rows."""
import math
import os

import pytest
from conftest import committed_run
from scipy import stats

from scratchnet.study import robustness

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def worst_row(recipe, T, seed, eps, rate):
    return {"recipe": recipe, "T": T, "seed": seed, "eps": eps, "attack": "worst", "robust_accuracy": rate}


def test_over_seeds_is_the_t_interval_of_the_per_seed_worst_case():
    settings = {"recipes": ["temperature"], "T": [1.0, 20.0], "eps": [0.1], "seeds": [0, 1, 2]}
    rows = [worst_row("standard", 1.0, s, 0.1, r) for s, r in enumerate([0.66, 0.65, 0.67])]
    rows += [worst_row("temperature", 20.0, s, 0.1, r) for s, r in enumerate([0.775, 0.78, 0.02])]
    rows += [{**worst_row("temperature", 20.0, 0, 0.1, 0.5), "attack": "apgd-dlr"}]   # not the worst case
    out = robustness.over_seeds(rows, settings)
    assert [(r["recipe"], r["T"]) for r in out] == [("standard", 1.0), ("temperature", 20.0)]
    std, hot = out
    assert std["per_seed"] == pytest.approx([66.0, 65.0, 67.0])
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)                      # sample sd 1 point
    assert (std["mean"], std["lo"], std["hi"]) == pytest.approx((66.0, 66.0 - half, 66.0 + half))
    assert hot["mean"] == pytest.approx((77.5 + 78.0 + 2.0) / 3)
    assert (hot["lo"], hot["hi"]) == (0.0, 100.0)             # a wide interval, clipped to a rate's range


def test_the_readme_table_is_the_committed_run_s_output():
    """The README's three-seed robustness table is what ``over_seeds_markdown`` makes of the committed JSON."""
    run, readme = committed_run("robustness_vs_T_3seeds", "robustness_vs_T.json")
    assert run["settings"]["seeds"] == [0, 1, 2]
    table = robustness.over_seeds_markdown(run["worst_over_seeds"], run["rows"])
    assert table in readme
    with open(os.path.join(ROOT, "experiments", "results", "robustness_vs_T_3seeds", "robustness_vs_T_seeds.md")) as f:
        assert f.read() == table + "\n"
