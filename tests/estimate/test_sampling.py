"""Stratified coalition sampling: stratum counts, distinctness, determinism, resumable prefixes, presets."""

from __future__ import annotations

import math

import numpy as np
import pytest

from layershap.errors import LayershapError
from layershap.estimate.sampling import SAMPLERS, get_sampler, iter_stratified_masks, stratified_masks


def rows(masks: np.ndarray) -> list[bytes]:
    return [m.tobytes() for m in masks]


def test_equal_counts_per_stratum_with_remainder_to_first_strata():
    masks = stratified_masks(32, 302, [30, 27, 24, 21, 18], seed=0)
    assert masks.shape == (302, 32) and masks.dtype == bool
    counts = {s: int(c) for s, c in zip(*np.unique(masks.sum(1), return_counts=True), strict=True)}
    assert counts == {30: 61, 27: 61, 24: 60, 21: 60, 18: 60}


def test_masks_are_distinct_and_avoid_excluded_rows():
    first = stratified_masks(10, 200, [9, 8, 5], seed=3)
    assert len(set(rows(first))) == 200
    more = stratified_masks(10, 107, [9, 8, 5], seed=4, exclude=first)  # 10 + 45 + 252 - 200 remain
    assert len(set(rows(more))) == 107
    assert not set(rows(more)) & set(rows(first))


def test_exhausted_stratum_gives_its_share_to_the_others():
    # Only 8 masks keep 7 of 8 players; the 2 other strata absorb the rest of the budget.
    masks = stratified_masks(8, 60, [7, 4, 3], seed=0)
    sizes = masks.sum(1)
    assert (sizes == 7).sum() == 8
    assert (sizes == 4).sum() == 26 and (sizes == 3).sum() == 26
    assert len(set(rows(masks))) == 60


def test_budget_beyond_all_distinct_masks_raises():
    with pytest.raises(LayershapError, match="distinct masks"):
        stratified_masks(5, 20, [4, 1], seed=0)   # only 5 + 5 exist


def test_deterministic_by_seed():
    a = stratified_masks(24, 100, [20, 12, 6], seed=7)
    b = stratified_masks(24, 100, [20, 12, 6], seed=7)
    c = stratified_masks(24, 100, [20, 12, 6], seed=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("paired", [False, True])
def test_smaller_budget_is_a_prefix_of_a_larger_one(paired):
    sizes = [31, 30, 24, 16, 2]  # mixes enumerated and rejection-sampled strata
    big = stratified_masks(32, 257, sizes, seed=11, paired=paired)
    for budget in (0, 1, 5, 63, 64, 200):
        small = stratified_masks(32, budget, sizes, seed=11, paired=paired)
        assert np.array_equal(small, big[:budget])


def test_prefix_holds_even_when_a_stratum_runs_out():
    big = stratified_masks(8, 60, [7, 4, 3], seed=2)
    assert np.array_equal(stratified_masks(8, 23, [7, 4, 3], seed=2), big[:23])


def test_paired_masks_come_with_their_complements():
    masks = stratified_masks(12, 40, [10, 9], seed=1, paired=True)
    assert np.array_equal(masks[1::2], ~masks[0::2])
    assert sorted(set(masks.sum(1).tolist())) == [2, 3, 9, 10]
    assert len(set(rows(masks))) == 40


def test_paired_half_size_stratum_stays_distinct():
    # A size-5 mask of 10 players has a size-5 complement: neither may appear twice.
    masks = stratified_masks(10, 252, [5], seed=0, paired=True)  # all C(10, 5) = 252 masks
    assert len(set(rows(masks))) == 252


def test_stream_yields_each_mask_of_a_small_game_once():
    masks = np.stack(list(iter_stratified_masks(6, range(7), seed=0)))
    assert masks.shape == (64, 6) and len(set(rows(masks))) == 64


def test_bad_keep_sizes_raise():
    with pytest.raises(LayershapError, match=r"0\.\.8"):
        stratified_masks(8, 4, [9], seed=0)
    with pytest.raises(LayershapError):
        stratified_masks(8, 4, [], seed=0)
    with pytest.raises(LayershapError, match=r"\[masks, 8\]"):
        stratified_masks(8, 4, [4], seed=0, exclude=np.zeros((2, 7), dtype=bool))


def test_paper_preset_matches_official_strata_and_scales():
    paper = get_sampler("paper")
    assert paper.keep_sizes(32) == [30, 27, 24, 21, 18]
    assert paper.keep_sizes(30) == [28, 25, 23, 20, 17]   # half-up rounding of 30 * s / 32
    assert paper.keep_sizes(4) == [3, 2]                  # clipped to 1..n-1 and deduplicated
    masks = paper.masks(32, 50, seed=0)
    assert sorted(np.unique(masks.sum(1)).tolist()) == [18, 21, 24, 27, 30]
    assert np.all(np.unique(masks.sum(1), return_counts=True)[1] == 10)


def test_shapley_preset_covers_every_size_and_draws_the_empty_model_first():
    sizes = get_sampler("shapley").keep_sizes(16)
    assert sizes[:2] == [16, 0] and sorted(sizes) == list(range(17))
    masks = get_sampler("shapley").masks(16, 16 * 5, seed=0)
    assert set(masks.sum(1).tolist()) == set(range(17))
    assert not masks[1].any()  # the empty coalition right after the full model


def test_target_preset_centres_on_the_target():
    target = get_sampler("target")
    assert target.keep_sizes(32, 8) == [31, 30, 26, 25, 24, 23, 22]
    assert target.keep_sizes(32, 1) == [31, 30, 29]
    assert target.keep_sizes(32, None) == get_sampler("shapley").keep_sizes(32)
    with pytest.raises(LayershapError):
        target.keep_sizes(32, 32)


def test_target_preset_measures_every_single_removal_first():
    target = get_sampler("target")
    masks = target.masks(12, 40, target_removed=3, seed=0)
    assert (masks[:12].sum(1) == 11).all() and len(set(rows(masks[:12]))) == 12
    rest = masks[12:].sum(1)
    assert 11 not in rest.tolist() and {10, 9, 8, 7} <= set(rest.tolist())
    np.testing.assert_array_equal(target.masks(12, 25, target_removed=3, seed=0), masks[:25])  # still a prefix
    assert (target.masks(12, 12, seed=0).sum(1) != 11).any()  # without a target: the shapley strata as they were


def test_complete_strata_come_first_also_when_paired():
    masks = stratified_masks(8, 30, [6, 4], seed=1, paired=True, complete_first=[7])
    assert (masks[0:16:2].sum(1) == 7).all() and (masks[1:16:2].sum(1) == 1).all()
    np.testing.assert_array_equal(masks[1:16:2], ~masks[0:16:2])
    assert len(set(rows(masks))) == 30


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(LayershapError) as err:
        get_sampler("nope")
    for name in SAMPLERS:
        assert name in str(err.value)


def test_large_sparse_stratum_is_fast_and_distinct():
    masks = stratified_masks(64, 3000, [32], seed=0)
    assert len(set(rows(masks))) == 3000
    assert math.comb(64, 32) > 1e15  # rejection-sampled, never enumerated
