"""The baseline pruning methods: the common contract, exact pass accounting, and each method's defining
property on a constructed case (tiny random models, windows of random tokens)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from tiny_models import VOCAB, tiny_model

from layershap.data.windows import TextWindows
from layershap.errors import LayershapError
from layershap.models.layers import block_list
from layershap.plan.methods import METHODS, select_layers
from layershap.plan.methods.sleb import sleb_passes

N = 6  # blocks of every tiny model
SAMPLES = 4
# The baselines tested here; the Shapley method has its own tests (its defaults need more masks than six
# blocks have).
BASELINES = ("shortgpt", "angular", "loo", "taylor", "sleb", "magnitude", "random", "last")


def make_windows(samples: int = SAMPLES, seq_len: int = 16, seed: int = 0) -> TextWindows:
    tokens = torch.randint(0, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))
    return TextWindows(tokens, "random", "calibration", seed)


@pytest.fixture(scope="module")
def windows():
    return make_windows()


@pytest.fixture(scope="module")
def llama():
    """One tiny llama shared by tests that do not change it."""
    return tiny_model("llama")


def make_identity(model, index: int) -> None:
    """Zero the output projections of a llama block, so it returns its input exactly."""
    block = block_list(model)[index]
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()


def expected_passes(method: str, n: int, k: int, protect) -> int | None:
    m = n - len(set(protect))
    return {"shortgpt": 1, "angular": 1, "loo": n + 1, "taylor": 2, "sleb": sleb_passes(m, k),
            "magnitude": 0, "random": 0, "last": 0}.get(method)


class ForwardCounter:
    """Counts calls of the model's top-level forward."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1

    def remove(self):
        self._handle.remove()


# --- the contract every baseline keeps --------------------------------------------------------------------

def test_baselines_are_registered():
    assert set(BASELINES) <= set(METHODS)


@pytest.mark.parametrize("method", BASELINES)
def test_plan_contract_and_exact_pass_count(method, llama, windows):
    k, protect, batch_size = 2, [0, 4], 2  # two model calls per pass over the four windows
    counter = ForwardCounter(llama)
    started = time.perf_counter()
    try:
        plan = select_layers(method, llama, windows, k, protect=protect, batch_size=batch_size, seed=3)
    finally:
        counter.remove()
    elapsed = time.perf_counter() - started
    assert plan.method == method and plan.n_layers == N
    assert len(plan.remove) == k
    assert plan.remove == sorted(set(plan.remove))
    assert all(0 <= i < N for i in plan.remove)
    assert not set(plan.remove) & set(protect)
    assert 0 < plan.seconds <= elapsed  # the time spent choosing, measured around the choice
    json.dumps(plan.to_dict(), allow_nan=False)  # the plan is written to layershap.json
    if plan.scores is not None:
        assert len(plan.scores) == N and all(np.isfinite(plan.scores))

    expected = expected_passes(method, N, k, protect)
    if expected is not None:
        assert plan.forward_passes == expected
        # A backward pass is counted as one more pass but makes no forward call.
        model_passes = expected - 1 if method == "taylor" else expected
        assert counter.calls == model_passes * (SAMPLES // batch_size)


@pytest.mark.parametrize("method", BASELINES)
def test_deterministic(method, llama, windows):
    first = select_layers(method, llama, windows, 2, protect=[1, 3])
    second = select_layers(method, llama, windows, 2, protect=[1, 3])
    assert first.remove == second.remove
    assert first.scores == second.scores
    assert first.forward_passes == second.forward_passes


@pytest.mark.parametrize("method", BASELINES)
def test_too_many_layers_raises(method, llama, windows):
    with pytest.raises(LayershapError, match="cannot remove"):
        select_layers(method, llama, windows, N - 1, protect=[0, 5])


@pytest.mark.parametrize("method", BASELINES[1:])
def test_bad_protect_or_k_raises(method, llama, windows):
    with pytest.raises(LayershapError, match="does not exist"):
        select_layers(method, llama, windows, 1, protect=[N])
    with pytest.raises(LayershapError):
        select_layers(method, llama, windows, -1)


@pytest.mark.parametrize("method", BASELINES[1:])
def test_removing_nothing(method, llama, windows):
    assert select_layers(method, llama, windows, 0).remove == []


@pytest.mark.parametrize("model_type", ["gpt2", "mamba"])
@pytest.mark.parametrize("method", ["angular", "taylor", "magnitude"])
def test_other_families(method, model_type, windows):
    model = tiny_model(model_type)
    flags = [p.requires_grad for p in model.parameters()]
    plan = select_layers(method, model, windows, 2, protect=[5])
    assert len(plan.remove) == 2 and 5 not in plan.remove
    assert all(np.isfinite(plan.scores))
    assert [p.requires_grad for p in model.parameters()] == flags


# --- each method's defining property --------------------------------------------------------------------

def test_shortgpt_removes_identity_block(windows):
    model = tiny_model("llama")
    make_identity(model, 3)
    plan = METHODS["shortgpt"](model, windows, 1)
    assert plan.remove == [3]
    assert plan.scores[3] == pytest.approx(0.0, abs=1e-6)


def test_loo_removes_identity_block(windows):
    model = tiny_model("llama")
    make_identity(model, 2)
    plan = METHODS["loo"](model, windows, 1)
    assert plan.remove == [2]
    # Skipping a block that returns its input changes nothing: no NLL increase.
    assert plan.scores[2] == pytest.approx(0.0, abs=1e-5)
    assert plan.details["nll_without"][2] == pytest.approx(plan.details["base_nll"], abs=1e-5)


def test_loo_scores_are_nll_increase(llama, windows):
    from layershap.game.layer_game import LayerGame

    plan = METHODS["loo"](llama, windows, 1)
    game = LayerGame(llama, windows)
    mask = np.ones(N, dtype=bool)
    mask[4] = False
    assert plan.scores[4] == pytest.approx(game.nll(mask) - game.base_nll, abs=1e-9)
    assert plan.remove == [int(np.argmin(plan.scores))]


def test_sleb_first_step_is_loo_argmin(llama, windows):
    loo_plan = METHODS["loo"](llama, windows, 1, protect=[0])
    sleb_plan = METHODS["sleb"](llama, windows, 3, protect=[0])
    assert sleb_plan.details["steps"][0]["removed"] == loo_plan.remove[0]
    first = sleb_plan.details["first_step_nll"]
    assert first[0] is None
    assert first[1:] == pytest.approx(loo_plan.details["nll_without"][1:], abs=1e-9)
    # Greedy: each step's NLL is that of the model without all blocks removed so far.
    removed = [s["removed"] for s in sleb_plan.details["steps"]]
    assert sleb_plan.remove == sorted(removed)
    from layershap.game.layer_game import LayerGame

    mask = np.ones(N, dtype=bool)
    mask[removed] = False
    assert LayerGame(llama, windows).nll(mask) == pytest.approx(sleb_plan.details["steps"][-1]["nll"], abs=1e-9)


def test_sleb_prefix_shared_trials_equal_plain_passes_exactly(llama, windows):
    from layershap.game.layer_game import LayerGame

    plan = METHODS["sleb"](llama, windows, 3)
    plain = LayerGame(llama, windows)
    keep = np.ones(N, dtype=bool)
    first = []
    for i in range(N):
        mask = keep.copy()
        mask[i] = False
        first.append(plain.nll(mask))
    assert plan.details["first_step_nll"] == first  # bit for bit, not approximately
    for step in plan.details["steps"]:
        keep[step["removed"]] = False
        assert plain.nll(keep) == step["nll"]


def test_sleb_greedy_steps_on_identity_blocks(windows):
    model = tiny_model("llama")
    make_identity(model, 1)
    make_identity(model, 4)
    base = METHODS["loo"](model, windows, 1).details["base_nll"]
    plan = METHODS["sleb"](model, windows, 2)
    first, second = plan.details["steps"]
    # Removing an identity block changes nothing, so each greedy step can always keep the NLL it has: step 1
    # is no worse than the full model and step 2 (measured on the shortened model) no worse than step 1. On a
    # random model another block may even lower the NLL, so which blocks go is not fixed.
    assert first["nll"] <= base + 1e-5
    assert second["nll"] <= first["nll"] + 1e-5
    assert plan.details["first_step_nll"][1] == pytest.approx(base, abs=1e-5)
    assert plan.details["first_step_nll"][4] == pytest.approx(base, abs=1e-5)
    assert plan.forward_passes == N + (N - 1)


def test_angular_picks_run_of_identity_blocks(windows):
    model = tiny_model("llama")
    make_identity(model, 2)
    make_identity(model, 3)
    plan = METHODS["angular"](model, windows, 2)
    assert plan.remove == [2, 3]
    assert plan.details["start"] == 2
    assert plan.details["run_distances"][2] == pytest.approx(0.0, abs=1e-6)
    assert all(d > 1e-3 for i, d in enumerate(plan.details["run_distances"]) if i != 2)
    # The chosen run scores lowest.
    assert max(plan.scores[i] for i in plan.remove) <= min(plan.scores[i] for i in plan.kept)


def test_angular_skips_runs_with_a_protected_block(windows):
    model = tiny_model("llama")
    make_identity(model, 2)
    make_identity(model, 3)
    plan = METHODS["angular"](model, windows, 2, protect=[3])
    assert plan.remove == list(range(plan.remove[0], plan.remove[0] + 2))
    assert 3 not in plan.remove
    assert plan.scores[3] == 1.0
    assert max(plan.scores[i] for i in plan.remove) <= min(plan.scores[i] for i in plan.kept)
    with pytest.raises(LayershapError, match="consecutive"):
        METHODS["angular"](model, windows, 3, protect=[2, 5])  # runs 0-2, 1-3, 3-5 and 2-4 all blocked


def test_angular_distance_is_last_token_arccos(llama, windows):
    from layershap.plan.methods.angular import last_token_states

    inputs, outputs = last_token_states(llama, windows.tokens)
    x, y = inputs[1], outputs[2]  # entering block 1, leaving block 2
    cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
    expected = float((torch.arccos(cos) / torch.pi).mean())
    plan = METHODS["angular"](llama, windows, 2)
    assert plan.details["run_distances"][1] == pytest.approx(expected, abs=1e-9)


def test_taylor_gives_identity_block_zero_importance(windows):
    model = tiny_model("llama")
    make_identity(model, 4)
    plan = METHODS["taylor"](model, windows, 1)
    assert plan.remove == [4]
    assert plan.scores[4] <= 1e-9 * max(plan.scores)


def test_taylor_matches_autograd_and_restores_state(windows):
    model = tiny_model("llama")
    frozen = block_list(model)[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    plan = METHODS["taylor"](model, windows, 1, batch_size=3)  # batches of 3 and 1 windows
    assert not frozen.requires_grad and all(p.grad is None for p in model.parameters())

    # Reference: one autograd pass over all windows at once.
    import torch.nn.functional as F

    tokens = windows.tokens
    block = block_list(model)[2]
    for p in block.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=tokens, use_cache=False).logits
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    expected = sum(float((p * p.grad).abs().sum().detach()) for p in block.parameters())
    assert plan.scores[2] == pytest.approx(expected, rel=1e-4)


def test_taylor_on_bfloat16_raises(windows):
    model = tiny_model("llama").to(torch.bfloat16)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(LayershapError, match="taylor needs gradients.*--dtype float32"):
        METHODS["taylor"](model, windows, 1)
    assert [p.requires_grad for p in model.parameters()] == flags


def test_magnitude_picks_scaled_down_block(windows):
    model = tiny_model("llama")
    with torch.no_grad():
        for p in block_list(model)[3].parameters():
            p.mul_(0.5)
    plan = METHODS["magnitude"](model, windows, 1)
    assert plan.remove == [3]
    assert plan.forward_passes == 0
    matrices = [p for p in block_list(model)[3].parameters() if p.dim() >= 2]
    expected = sum(float(p.detach().abs().sum()) for p in matrices) / sum(p.numel() for p in matrices)
    assert plan.scores[3] == pytest.approx(expected, rel=1e-6)


def test_random_is_seeded(llama, windows):
    plans = {seed: METHODS["random"](llama, windows, 2, protect=[0], seed=seed).remove for seed in range(12)}
    assert plans[5] == METHODS["random"](llama, windows, 2, protect=[0], seed=5).remove
    assert len({tuple(p) for p in plans.values()}) > 1
    assert all(0 not in p for p in plans.values())


@pytest.mark.parametrize(("k", "protect", "expected"), [
    (2, [], [3, 4]),
    (1, [], [4]),
    (2, [5], [3, 4]),
    (2, [4], [2, 3]),
    (2, [3, 4], [1, 2]),
    (5, [], [0, 1, 2, 3, 4]),
    (6, [], [0, 1, 2, 3, 4, 5]),
    (2, [0, 1, 2, 3], [4, 5]),
])
def test_last_drops_blocks_before_the_final_one(llama, windows, k, protect, expected):
    assert METHODS["last"](llama, windows, k, protect=protect).remove == expected
