"""benchmarks/heldout_race.py: the geometric mean over genres and the per-draw ratio to the best rival."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import heldout_race as race


def test_geometric_mean():
    assert race.geometric_mean([4.0, 9.0]) == pytest.approx(6.0)
    assert race.geometric_mean([4.0, math.inf]) == math.inf


def test_summary_is_the_ratio_to_each_draws_best_rival():
    rows = [{"mixture": "c4", "k": 7, "draw": d, "method": m, "geomean": g}
            for d, values in enumerate([{"shapley+confirm": 90.0, "shortgpt": 100.0, "angular": 120.0},
                                        {"shapley+confirm": 110.0, "shortgpt": 130.0, "angular": 100.0}])
            for m, g in values.items()]
    (summary,) = race.summarise(rows)
    assert summary["method"] == "shapley+confirm"
    assert [d["best_rival"] for d in summary["draws"]] == ["shortgpt", "angular"]
    assert summary["mean_ratio"] == pytest.approx((0.9 + 1.1) / 2)
    assert summary["worst_ratio"] == pytest.approx(1.1)
    rows = [{**r, "removed": [1], "cost": {"passes": 1, "token_passes": 10}} for r in rows]
    assert "| c4 | 7 | shapley+confirm | 0.900 (shortgpt), 1.100 (angular) | 1.000 | 1.100 |" in race.markdown(rows, [summary])
