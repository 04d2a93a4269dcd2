"""The summaries of distillation_vs_temperature.py (the seed-to-seed spread, the verdict) on made-up values."""
import math
import os

import numpy as np
from conftest import committed_run

from scratchnet.study import distillation

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def per_model_from(values):
    """{(recipe, T, seed): {measure: {"value": v}}} with every measure set from ``values[(recipe, T)][seed]``."""
    names = [m[0] for m in distillation.MEASURES]
    return {(recipe, T, seed): {name: {"value": v} for name in names}
            for (recipe, T), per_seed in values.items() for seed, v in enumerate(per_seed)}


def test_spread_is_the_sample_sd_and_range_over_seeds():
    values = {("standard", 1.0): [1.0, 2.0, 4.0], ("temperature", 20.0): [10.0, 10.0, 10.0],
              ("distilled", 20.0): [3.0, 5.0, 13.0]}
    rows = distillation.spread(per_model_from(values), {"T": [1.0, 20.0], "seeds": [0, 1, 2]})
    n_measures = len(distillation.MEASURES)                 # the logit margin among them
    assert len(rows) == 3 * n_measures
    by = {(r["recipe"], r["T"], r["measure"]): r for r in rows}
    r = by[("distilled", 20.0, distillation.MARGIN)]
    assert r["unit"] == "logit" and r["n_seeds"] == 3
    assert r["mean"] == 7.0
    assert math.isclose(r["sd"], math.sqrt(((3 - 7) ** 2 + (5 - 7) ** 2 + (13 - 7) ** 2) / 2))   # ddof = 1
    assert (r["min"], r["max"], r["range"]) == (3.0, 13.0, 10.0)
    assert by[("temperature", 20.0, "test accuracy")]["sd"] == 0.0
    assert math.isclose(by[("standard", 1.0, "JSMA success, fixed")]["sd"], np.std([1.0, 2.0, 4.0], ddof=1))


def test_spread_leaves_out_missing_values_and_has_no_sd_from_one_seed():
    values = {("standard", 1.0): [1.0, math.nan], ("temperature", 20.0): [2.0, 3.0],
              ("distilled", 20.0): [math.nan, math.nan]}
    rows = distillation.spread(per_model_from(values), {"T": [1.0, 20.0], "seeds": [0, 1]})
    assert {r["recipe"] for r in rows} == {"standard", "temperature"}        # no value at all: no row
    one = [r for r in rows if r["recipe"] == "standard"]
    assert all(r["n_seeds"] == 1 and math.isnan(r["sd"]) and r["range"] == 0.0 for r in one)
    two = [r for r in rows if r["recipe"] == "temperature"]
    assert all(r["n_seeds"] == 2 and math.isclose(r["sd"], math.sqrt(0.5)) for r in two)


def made_up_runs(distilled_shift):
    """Three seeds at T = 1 and 20; every distilled value at T = 20 is shifted by ``distilled_shift[measure]``."""
    names = [m[0] for m in distillation.MEASURES]
    per_model = {}
    for seed in range(3):
        base = {name: 50.0 + seed for name in names}           # a seed-to-seed spread of 1
        per_model[("standard", 1.0, seed)] = {n: {"value": v, "k": 1, "n": 2} for n, v in base.items()}
        per_model[("temperature", 20.0, seed)] = {n: {"value": v, "k": 1, "n": 2} for n, v in base.items()}
        per_model[("distilled", 20.0, seed)] = {n: {"value": v + distilled_shift.get(n, 0.0), "k": 1, "n": 2}
                                                for n, v in base.items()}
    settings = {"T": [1.0, 20.0], "seeds": [0, 1, 2]}
    rows = distillation.compare(per_model, settings)
    return rows, distillation.verdict(rows, per_model, settings)


def test_the_verdict_follows_the_attack_measures_and_only_names_a_gradient_difference():
    rows, text = made_up_runs({"loss-gradient suppression, masked": -30.0})
    supp = next(r for r in rows if r["measure"] == "loss-gradient suppression, masked")
    assert supp["intervals_overlap"] is False and supp["better_defence"] == "-"
    assert "distillation adds nothing detectable" in text
    assert "measures of the masking, not of defence: loss-gradient suppression, masked at T = 20" in text
    assert "with no correction for the 4 made" in text                  # the four attack measures


def test_the_verdict_names_an_attack_measure_where_distillation_is_better():
    rows, text = made_up_runs({"JSMA success, masked": -20.0})
    jsma = next(r for r in rows if r["measure"] == "JSMA success, masked")
    assert jsma["intervals_overlap"] is False and jsma["better_defence"] == "distilled"
    assert "distillation is the better defence on 1: JSMA success, masked at T = 20" in text
    assert "distillation adds nothing detectable" not in text


def test_the_verdict_says_when_every_difference_is_in_a_masked_attack():
    _, text = made_up_runs({"JSMA success, masked": -20.0})
    assert "the recipes differ in how much they mask, not in robustness" in text
    _, text = made_up_runs({"JSMA success, masked": -20.0, "FGSM success, fixed": -20.0})
    assert "distillation is the better defence on 2" in text
    assert "not in robustness" not in text                   # a fixed attack separates too


def test_the_readme_tables_are_the_committed_run_s_outputs():
    """The README's run S tables are what ``markdown`` makes of the committed JSON, to the letter."""
    run, readme = committed_run("distillation_vs_temperature", "distillation_vs_temperature.json")
    assert run["settings"]["seeds"] == [0, 1, 2]
    comparison, spread = distillation.markdown(run["rows"], run["spread"])
    assert comparison in readme and spread in readme
    with open(os.path.join(ROOT, "experiments", "results", "distillation_vs_temperature",
                           "distillation_vs_temperature.md")) as f:
        assert f.read() == comparison + "\n\n" + spread + "\n"
