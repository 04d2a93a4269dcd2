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


def test_worst_markdown_pools_the_seeds_and_puts_the_masked_attack_beside_the_worst_case():
    settings = {"recipes": ["distilled"], "T": [1.0, 100.0], "eps": [0.3], "seeds": [0, 1]}

    def row(recipe, T, seed, eps, attack, k, n=10):
        return {"recipe": recipe, "T": T, "seed": seed, "eps": eps, "attack": attack, "n_robust": k, "n": n}
    rows = [row("standard", 1.0, s, 0.0, "clean", 10) for s in (0, 1)]
    rows += [row("distilled", 100.0, s, 0.0, "clean", 9) for s in (0, 1)]
    rows += [row("standard", 1.0, s, 0.3, a, 0) for s in (0, 1) for a in ("apgd-ce", "worst")]
    rows += [row("distilled", 100.0, 0, 0.3, "apgd-ce", 10), row("distilled", 100.0, 1, 0.3, "apgd-ce", 8),
             row("distilled", 100.0, 0, 0.3, "worst", 1), row("distilled", 100.0, 1, 0.3, "worst", 0),
             row("distilled", 100.0, 0, 0.3, "square", 7)]                     # neither column
    lo, hi = robustness.wilson(1, 20)
    assert robustness.worst_markdown(rows, settings).splitlines() == [
        "| model | clean | eps 0.3: APGD-CE at T=1 / **worst case** [95 %] |",
        "| --- | --- | --- |",
        "| standard, T = 1 | 100.0 | 0.0 / **0.0** [0.0, 16.1] |",
        f"| distilled, T = 100 | 90.0 | 90.0 / **5.0** [{100 * lo:.1f}, {100 * hi:.1f}] |"]


def test_the_readme_table_is_the_committed_full_run_output():
    """The README's full-run table is what ``worst_markdown`` makes of the committed JSON of
    ``python experiments/robustness_vs_T.py`` (the default full run)."""
    run, readme = committed_run("robustness_vs_T", "robustness_vs_T.json")
    settings = run["settings"]
    assert settings["seeds"] == [0] and settings["n"] == robustness.FULL["n"] and not settings["quick"]
    assert settings["T"] == robustness.FULL["T"] and settings["eps"] == robustness.FULL["eps"]
    table = robustness.worst_markdown(run["rows"], settings)
    assert table in readme
    with open(os.path.join(ROOT, "experiments", "results", "robustness_vs_T", "robustness_vs_T_worst.md")) as f:
        assert f.read() == table + "\n"
