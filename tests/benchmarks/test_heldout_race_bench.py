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
    rows = [{**r, "removed": [1], "cost": {"passes": 1, "token_passes": 10}, "seconds": 2.0} for r in rows]
    assert "| c4 | 7 | shapley+confirm | 0.900 (shortgpt), 1.100 (angular) | 1.000 | 1.100 |" in race.markdown(rows, [summary])


def test_block_ranges_and_the_per_draw_table():
    assert race.block_ranges([18, 5, 12, 13, 14, 16, 17]) == "5, 12-14, 16-18"
    rows = [{"mixture": "c4", "k": 2, "draw": 0, "method": m, "removed": r, "geomean": g}
            for m, r, g in [("shapley", [3, 4], 9.5), ("sleb", [1, 4], 9.25)]]
    table = race.per_draw_tables(rows)
    assert table[-3:] == ["| draw | shapley | sleb |", "|---|---|---|", "| 0 | 3-4: 9.50 | 1, 4: **9.25** |"]


def test_budget_variants_are_judged_against_the_rivals_only():
    rows = [{"mixture": "c4", "k": 7, "draw": 0, "method": m, "geomean": g}
            for m, g in {"shapley": 90.0, "shapley@64": 80.0, "shapley-kl@64": 85.0, "sleb": 100.0}.items()]
    summary = {s["method"]: s for s in race.summarise(rows)}
    assert set(summary) == {"shapley", "shapley@64", "shapley-kl@64"}
    assert summary["shapley"]["mean_ratio"] == pytest.approx(0.9)  # not compared with shapley@64's 80
    assert summary["shapley@64"]["draws"][0]["best_rival"] == "sleb"


def test_mixtures_are_compared_on_the_genres_none_of_them_contains():
    ppl = {"c4": 30.0, "wiki": 20.0, "code": 10.0, "tiny": 4.0, "technical": 9.0, "multilingual": 1.0}
    rows = [{"mixture": "c4", "k": 7, "draw": 0, "method": "shapley", "ppl": ppl},
            {"mixture": "c4", "k": 7, "draw": 1, "method": "shapley", "ppl": {**ppl, "tiny": 36.0}},
            {"mixture": "c4,wiki,code", "k": 7, "draw": 0, "method": "shapley", "ppl": {**ppl, "wiki": 1e9}}]
    c4, mix = race.compare_mixtures(rows)
    assert c4["genres"] == mix["genres"] == ["tiny", "technical", "multilingual"]  # wiki, c4, code are in one
    assert (c4["draws"], c4["mean"], c4["worst"]) == (2, pytest.approx((3.3019 + 6.8683) / 2, rel=1e-4),
                                                      pytest.approx(6.8683, rel=1e-4))
    assert mix["mean"] == pytest.approx(3.3019, rel=1e-4)  # wiki's 1e9 is not judged: the mixture saw wiki
    assert race.compare_mixtures(rows[:2]) == []  # one mixture: nothing to compare


def test_merged_parts_keep_every_row_and_the_newer_of_a_repeat():
    a = [{"mixture": "c4", "draw": 0, "k": 7, "method": "sleb", "geomean": 1.0}]
    b = [{"mixture": "c4", "draw": 0, "k": 7, "method": "sleb", "geomean": 2.0},
         {"mixture": "c4", "draw": 1, "k": 7, "method": "sleb", "geomean": 3.0}]
    assert [r["geomean"] for r in race.merge_rows(a, b)] == [2.0, 3.0]


def test_sleb_at_a_smaller_k_is_the_first_steps_of_the_longer_run(monkeypatch):
    """SLEB is greedy: its plan at k is the first k steps of its run at a larger k, and so is its cost."""
    import torch
    from tiny_models import tiny_model

    from layershap.data.windows import TextWindows
    from layershap.plan.methods import select_layers
    from layershap.plan.methods.sleb import sleb_passes

    model = tiny_model("llama")
    windows = TextWindows(torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)),
                          "random", "calibration", 0)
    greedy = race.GreedySleb()
    long = greedy.plan(model, windows, 3, 3)
    short = greedy.plan(model, windows, 2, 3)
    direct = select_layers("sleb", model, windows, 2)
    assert short["removed"] == direct.remove
    assert short["cost"]["passes"] == sleb_passes(6, 2) == direct.cost.passes
    assert short["cost"]["token_passes"] == direct.cost.token_passes
    assert long["cost"]["passes"] == sleb_passes(6, 3)


def test_sleb_steps_kept_on_disk_are_not_run_again(tmp_path, monkeypatch):
    import torch
    from tiny_models import tiny_model

    from layershap.data.windows import TextWindows

    model = tiny_model("llama")
    windows = TextWindows(torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0)),
                          "random", "calibration", 0)
    first = race.GreedySleb(tmp_path).plan(model, windows, 2, 3)

    def no_run(*args, **kwargs):
        raise AssertionError("SLEB ran again")

    monkeypatch.setattr(race, "select_layers", no_run)
    again = race.GreedySleb(tmp_path)
    assert again.plan(model, windows, 2, 3) == first
    assert len(again.plan(model, windows, 3, 3)["removed"]) == 3
    with pytest.raises(AssertionError, match="ran again"):
        again.plan(model, windows, 4, 4)  # a longer run than the one kept


def test_heldout_cache_is_keyed_by_model_and_context_and_counts_what_it_read(tmp_path, tiny_tokenizer):
    """A reused cache serves a cell only to the model and setup that measured it: another model (other
    weights), dtype or batch size measures again, and the counts say how many cells came from the cache."""
    import torch
    from tiny_models import tiny_model

    path = tmp_path / "heldout.json"
    genres = ["tiny", "technical"]  # the two smallest texts: quick to tokenize

    def held_out(model, **options):
        return race.HeldOut(model, tiny_tokenizer, 1, 8, path, genres=genres, **options)

    first = held_out(tiny_model("llama"))
    measured = first.ppl([1], genres)
    assert (first.read, first.measured) == (0, 2)
    assert first.ppl([1], genres) == measured and (first.read, first.measured) == (2, 2)
    assert "2 of 4 cells read from the cache" in first.summary()

    same = held_out(tiny_model("llama"))
    assert same.ppl([1], genres) == measured and (same.read, same.measured) == (2, 0)

    other = tiny_model("llama")
    with torch.no_grad():
        next(other.parameters()).add_(0.5)
    for fresh in (held_out(other), held_out(tiny_model("llama").to(torch.float64)),
                  held_out(tiny_model("llama"), batch_size=1)):
        fresh.ppl([1], genres)
        assert (fresh.read, fresh.measured) == (0, 2)
    assert held_out(other).ppl([1], genres) != measured


def test_the_screened_row_has_the_screenings_own_cost_and_seconds(tmp_path, tiny_tokenizer):
    """`shapley+confirm:screened` is the run without its confirmation: the confirmed run's cost and seconds
    less the confirmation's, not a copy of them."""
    from types import SimpleNamespace

    from tiny_models import tiny_model

    from layershap.data.windows import text_windows

    calibration = text_windows("tiny", tiny_tokenizer, samples=2, seq_len=8, seed=0)
    args = SimpleNamespace(budget=40, confirm=2, k_values=[2], paper_budget=8)
    confirmed, screened = race.run_method("shapley+confirm", tiny_model("llama"), tiny_tokenizer, "tiny",
                                          calibration, 2, args, tmp_path / "s.sqlite")
    assert screened["method"] == "shapley+confirm:screened"
    spent = confirmed["confirmation"]
    assert confirmed["cost"]["passes"] > screened["cost"]["passes"] > 0
    for key in ("passes", "token_passes", "paid_passes", "paid_token_passes"):
        assert screened["cost"][key] + spent["cost"][key] == confirmed["cost"][key]
    assert 0 < screened["seconds"] < confirmed["seconds"]
    assert screened["seconds"] + spent["seconds"] == pytest.approx(confirmed["seconds"])
    assert screened["cold"] and confirmed["cold"]


def test_the_docs_cost_table_is_the_race_json():
    """docs/benchmarks.md's cost table of the grid, caption included, says what docs/results/heldout_race.json
    holds: the draws per cell, each row's mean and worst geometric mean, used passes and token-passes."""
    import json
    import re
    import statistics

    root = Path(__file__).parents[2]
    rows = json.loads((root / "docs/results/heldout_race.json").read_text())["rows"]
    text = (root / "docs/benchmarks.md").read_text()
    caption = re.search(r"\*\*Cost and quality over the draws\*\* \((\d+) a cell[^\n]*\n[^\n]*\n\n(.*?)\n\n", text,
                        re.DOTALL)
    assert caption, "the cost table's caption no longer says how many draws a cell holds"
    draws, table = int(caption.group(1)), caption.group(2).splitlines()[2:]
    assert len(table) > 20
    for line in table:
        mixture, k, method, mean, worst, passes, token_passes, _ = (c.strip() for c in line.strip("|").split("|"))
        cell = [r for r in rows if (r["mixture"], r["k"], r["method"]) == (mixture.strip("`"), int(k), method)]
        geomeans = [r["geomean"] for r in cell]
        assert len(cell) == draws, line
        assert (f"{statistics.mean(geomeans):.2f}", f"{max(geomeans):.2f}") == (mean, worst), line
        assert {str(r["cost"]["passes"]) for r in cell} == {passes}, line
        assert {f"{r['cost']['token_passes'] / 1e6:.2f}" for r in cell} == {token_passes}, line
