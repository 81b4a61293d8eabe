"""Surrogate search for the best k-removal plan, and the refinement loop that measures its finalists."""

from itertools import combinations

import numpy as np
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.estimate.pipeline import EstimateSettings, estimate
from layershap.game.layer_game import LayerGame
from layershap.game.store import open_store
from layershap.plan.refine import best_measured, refine
from layershap.plan.search import removal_mask, top_removal_masks


def _quadratic(n, seed):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=n)
    interactions = np.triu(rng.normal(scale=0.8, size=(n, n)), 1)

    def predict(masks):
        x = np.asarray(masks, dtype=float)
        return x @ w + np.einsum("bi,ij,bj->b", x, interactions, x)

    return predict


def _brute_force_best(predict, n, k, protect=()):
    best, best_value = None, -np.inf
    for removal in combinations([i for i in range(n) if i not in protect], k):
        mask = np.ones(n, dtype=bool)
        mask[list(removal)] = False
        value = predict(mask[None])[0]
        if value > best_value:
            best, best_value = mask, value
    return best


def test_search_finds_the_best_subset_with_interactions():
    for seed in range(5):
        predict = _quadratic(10, seed)
        found = top_removal_masks(predict, 10, 4, beam=8, count=3)
        assert all(m.sum() == 6 for m in found)
        np.testing.assert_array_equal(found[0], _brute_force_best(predict, 10, 4))
        scores = predict(np.array(found))
        assert np.all(np.diff(scores) <= 1e-12)  # best first


def test_search_respects_protect_and_beats_ranking_by_single_values():
    predict = _quadratic(10, 7)
    found = top_removal_masks(predict, 10, 3, protect=[0, 9], count=5)
    assert all(m[0] and m[9] and m.sum() == 7 for m in found)
    np.testing.assert_array_equal(found[0], _brute_force_best(predict, 10, 3, protect=(0, 9)))


def test_best_measured_picks_lowest_nll_of_the_right_size():
    masks = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0]], dtype=bool)
    nlls = np.array([1.0, 1.5, 1.2, 3.0, np.nan])
    assert best_measured(masks, nlls, 1, (), 1.0).tolist() == [True, False, True, True]
    assert best_measured(masks, nlls, 1, (1,), 1.0).tolist() == [False, True, True, True]
    assert best_measured(masks, nlls, 2, (), 1.0).tolist() == [False, False, True, True]  # NaN is worst
    assert best_measured(masks, nlls, 3, (), 1.0) is None


def _tiny_game():
    model = tiny_model("llama")
    windows = TextWindows(torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)),
                          "random", "calibration", 0)
    return model, LayerGame(model, windows)


def test_refine_spends_exactly_the_budget_and_returns_a_measured_plan(tmp_path):
    model, game = _tiny_game()
    with open_store(model, tmp_path / "s.sqlite") as store:
        first = estimate(game, store, EstimateSettings(budget=20, budget_unit="masks", target_removed=2))
        result = refine(game, store, first.masks, first.nlls, k=2, budget=30, surrogate="pairwise", seed=0)
    assert len(result.masks) == 30 and result.evaluations == 10
    assert result.best.sum() == 4
    row = np.flatnonzero((result.masks == result.best).all(axis=1))[0]
    eligible = result.masks.sum(axis=1) == 4
    assert result.nlls[row] == np.nanmin(result.nlls[eligible])


def test_refine_spends_a_budget_of_full_passes_at_each_masks_share(tmp_path):
    from layershap.estimate.budget import mask_share, spent

    model, game = _tiny_game()
    share = mask_share(6)
    with open_store(model, tmp_path / "s.sqlite") as store:
        first = estimate(game, store, EstimateSettings(budget=20, target_removed=2))
        assert 20 - share(first.masks[-1]) < spent(first.masks, share) <= 20 + 1e-9
        assert len(first.masks) > 20  # cheaper than full passes: more masks than the budget's number
        result = refine(game, store, first.masks, first.nlls, k=2, budget=30, surrogate="pairwise", seed=0,
                        share=share)
    plan_share = 5 / 7  # 4 of 6 blocks kept, plus the head
    used = spent(result.masks, share)
    plans = {m.tobytes() for m in result.masks if m.sum() == 4}
    assert used <= 30 + 1e-9
    assert used > 30 - plan_share or len(plans) == 15  # spent, or every 2-of-6 removal measured


def test_refine_measures_the_seed_plans_first(tmp_path):
    model, game = _tiny_game()
    with open_store(model, tmp_path / "s.sqlite") as store:
        first = estimate(game, store, EstimateSettings(budget=20, target_removed=2))
        masks, nlls = first.masks[:1], first.nlls[:1]  # only the full model measured so far
        result = refine(game, store, masks, nlls, k=2, budget=6, surrogate="pairwise", seed=0,
                        seeds=[[0, 1], [2, 3], [0, 1]])
    seeded = result.masks[1:3]
    assert [sorted(np.flatnonzero(~m).tolist()) for m in seeded] == [[0, 1], [2, 3]]
    assert len(result.masks) == 6 and len({m.tobytes() for m in result.masks}) == 6


def test_neighbours_are_the_unmeasured_single_swaps_best_predicted_first():
    from layershap.plan.refine import _unmeasured_neighbours

    predict = _quadratic(8, 3)
    best = np.ones(8, dtype=bool)
    best[[1, 4]] = False
    measured = best.copy()
    measured[[1, 2]] = [True, False]  # one neighbour already measured
    found = _unmeasured_neighbours(predict, np.array([best, measured]), best, protect=(7,), wanted=100)
    swaps = []
    for removed in (1, 4):
        for kept in (0, 2, 3, 5, 6):  # 7 is protected
            mask = best.copy()
            mask[[removed, kept]] = [True, False]
            if not (mask == measured).all():
                swaps.append(mask)
    assert len(found) == len(swaps) == 9
    assert {m.tobytes() for m in found} == {m.tobytes() for m in swaps}
    scores = predict(np.array(found))
    assert (np.diff(scores) <= 1e-12).all()


def test_first_order_swaps_rank_by_the_two_measured_halves():
    from layershap.plan.refine import first_order_swaps

    best = np.array([True, False, True, True, False, True])  # removes 1 and 4
    kept, removed = np.array([0, 2, 3, 5]), np.array([1, 4])
    remove_cost = [0.5, 0.1, 0.35, 0.9]  # nll(best with this kept block also removed) - nll(best)
    restore_cost = [-0.2, 0.0]  # nll(best with this block restored) - nll(best)
    measured = best.copy()
    measured[[1, 2]] = [True, False]  # restore 1, remove 2: already measured, not proposed again
    swaps = first_order_swaps(best, kept, removed, remove_cost, restore_cost, measured={measured.tobytes()})
    pairs = [(int(np.flatnonzero(~best & s)[0]), int(np.flatnonzero(best & ~s)[0])) for s in swaps]
    assert pairs == [(4, 2), (1, 3), (1, 0), (4, 3), (4, 0), (1, 5), (4, 5)]  # (restored, removed)


def test_refine_ends_by_measuring_every_plan_one_block_from_its_best(tmp_path):
    """The polish: around one measured k-removal plan, every plan with a block more removed and every plan
    with one restored are measured (so a swap whose halves are each cheap is found), within the budget; a
    budget too small to pay for it (more than half of what the refinement has) skips it."""
    from layershap.estimate.budget import mask_share, spent

    model, game = _tiny_game()
    share = mask_share(6)

    def polished(masks):
        measured = {m.tobytes() for m in masks}
        for plan in (m for m in masks if m.sum() == 4):
            near = [m for m in masks if m.sum() in (3, 5) and (m != plan).sum() == 1]
            if len(near) == 4 + 2 and all(m.tobytes() in measured for m in near):
                return True
        return False

    with open_store(model, tmp_path / "s.sqlite") as store:
        first = estimate(game, store, EstimateSettings(budget=20, target_removed=2))
        near_full = first.masks.sum(axis=1) >= 5  # the full model and single removals: no plan of 3 removals
        first_masks, first_nlls = first.masks[near_full], first.nlls[near_full]
        assert len(first_masks) == 7
        start = spent(first_masks, share)
        result = refine(game, store, first_masks, first_nlls, k=2, budget=start + 16, surrogate="pairwise",
                        seed=0, share=share)
        small = refine(game, store, first_masks, first_nlls, k=2, budget=start + 4, surrogate="pairwise",
                       seed=0, share=share)
    assert polished(result.masks)
    assert spent(result.masks, share) <= start + 16 + 1e-9
    assert not polished(small.masks)


def test_polish_starts_again_around_a_better_plan_while_the_budget_holds(monkeypatch):
    """An additive game (each removed block costs its own amount) where the best plan is two swaps from the
    start: the first polish finds a plan one swap better, and only a second start, around that plan, reaches
    the best. A budget that holds one start stops there, and no run spends more than it was given."""
    from layershap.plan import refine as refine_module

    cost = np.array([5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 0.2, 0.1])  # the best plan removes 6 and 7
    nll = lambda mask: 1.0 + float(cost[~mask].sum())
    monkeypatch.setattr(refine_module, "evaluate_masks",
                        lambda game, store, masks, description: (np.array([nll(m) for m in masks]), len(masks), 0))
    full, start = np.ones(8, dtype=bool), removal_mask(8, [0, 1])
    masks, nlls = np.array([full, start]), np.array([nll(full), nll(start)])

    def polish(budget):
        return refine_module._polish(None, None, masks, nlls, start, 2, (), 1.0, left=lambda m: budget - len(m),
                                     share=lambda m: 1.0, plan_share=1.0)

    one_start = 2 + 8 + refine_module.POLISH_SWAPS  # what is measured, probes and a batch of swaps
    for budget, best in ((2 * one_start, [6, 7]), (one_start, [1, 7])):
        grown, grown_nlls, evaluated = polish(budget)
        assert len(grown) <= budget and evaluated == len(grown) - 2
        plan = best_measured(grown, grown_nlls, 2, (), 1.0)
        assert sorted(np.flatnonzero(~plan)) == best


def test_polish_reserve_is_whole_starts_within_its_room_and_never_negative():
    """The reserve is 0, 1 or POLISH_ROUNDS starts; a room below zero (the estimate spent more than the
    refinement's budget) reserves nothing rather than lending the rounds budget they do not have."""
    from layershap.plan.refine import POLISH_ROUNDS, _polish_reserve

    assert _polish_reserve(26.0, 31.5) == 26.0
    assert _polish_reserve(26.0, 100.0) == POLISH_ROUNDS * 26.0
    assert _polish_reserve(26.0, 20.0) == 0.0
    assert _polish_reserve(26.0, -5.0) == 0.0
    assert _polish_reserve(0.0, 50.0) == 0.0


def test_the_polish_reserve_goes_to_the_rounds_also_when_no_plan_was_measured(monkeypatch):
    """A first phase that measures no k-removal plan (here: the surrogate search finds none the first time)
    leaves no plan to polish; the reserve kept back for the polish then goes to the surrogate rounds
    instead of being left unspent."""
    from layershap.plan import refine as refine_module

    cost = np.array([5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 0.2, 0.1])
    nll = lambda mask: 1.0 + float(cost[~mask].sum())
    monkeypatch.setattr(refine_module, "evaluate_masks",
                        lambda game, store, masks, description: (np.array([nll(m) for m in masks]), len(masks), 0))
    searches = []
    search = refine_module._unmeasured_top_plans

    def finds_nothing_the_first_time(*args, **kwargs):
        searches.append(kwargs["wanted"])
        return [] if len(searches) == 1 else search(*args, **kwargs)

    monkeypatch.setattr(refine_module, "_unmeasured_top_plans", finds_nothing_the_first_time)
    game = type("Game", (), {"n_players": 8, "utility": staticmethod(lambda v, base: base - v)})()
    masks = np.array([np.ones(8, dtype=bool), *(removal_mask(8, [i]) for i in range(8))])
    nlls = np.array([nll(m) for m in masks])
    budget = 36  # a polish start (12 masks) is reserved; 27 of the 28 two-block plans are bought
    polish = refine_module._polish_cost(8, 2, (), lambda m: 1.0, 1.0)
    assert 0 < polish and refine_module._polish_reserve(polish, 0.5 * (budget - len(masks))) > 0  # one was kept
    result = refine_module.refine(game, None, masks, nlls, k=2, budget=budget, surrogate="pairwise", seed=0)
    assert len(searches) > 1
    assert len(result.masks) == budget  # every mask of the budget bought, the polish's reserve included
    assert result.best is not None and result.best.sum() == 6
