"""Repair what removing blocks breaks, without training, folded into the weights the model already has.

When a run of blocks is removed, the residual stream the next kept block receives differs from what the
dense model had there: mostly in magnitude (the removed blocks' additions are missing), partly in direction.
Each recipe fits, per removed run ("cut"), a correction on calibration activations of the model with the
earlier cuts already removed and repaired, aiming at the dense model's stream after the run, and folds it
into existing weights so the saved model stays a stock architecture with the same parameter count.

Two corrections exist, and each has one place where folding it is exact:

- a *scale* `a` of the stream entering the first kept block after the cut. Every later reader of the stream
  normalises it (RMSNorm), so multiplying the stream by `a` is the same as dividing everything written to it
  from there on by `a`: the attention and MLP output projections of that block and every later one (weights
  and biases). Exact up to the norms' epsilon. A scale before the final norm changes nothing (the norm undoes
  it), so a run that ends at the last block gets none. The embedding is not touched, so tied embeddings stay
  tied. Recipes: `prunecomp` (Prune&Comp's magnitude ratio) and `scale` (layershap's: the median per-token norm
  ratio, which the few tokens with huge activations cannot dominate).
- a *map* `T` (d x d) of the MLP output of the last kept block before the cut (ReplaceMe): folded into that
  block's down projection, `W <- T^T W` (and `b <- b T`), exact in exact arithmetic. A run that starts at
  block 0 has no kept block before it: there the map would have to go into the embedding, which the output
  head may share, so that cut gets the recipe's fallback scale instead (the record says so).

Fitting happens with the corrections installed as hooks on the model with the plan's blocks skipped; folding
replaces the hooks by weight edits afterwards (`fold_repair`), and the tests check that both give the same
logits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from layershap.errors import LayershapError
from layershap.game.nll import mean_nll
from layershap.models.architectures import architecture_of
from layershap.models.layers import block_list, keep_only, normalise_layer_list
from layershap.plan.cost import Cost

# Families whose block writes to the stream only through `self_attn.o_proj` and `mlp.down_proj` (plain
# Linear layers) and reads it only through an RMSNorm/LayerNorm: the scale fold above is exact for them.
WRITERS = {t: ("self_attn.o_proj", "mlp.down_proj")
           for t in ("llama", "mistral", "qwen2", "qwen3", "olmo", "granite", "smollm3", "phi3")}
MLP_OUT = "mlp.down_proj"


@dataclass(frozen=True)
class Cut:
    """One removed run of blocks, `start..end` in the original numbering; `before` and `after` the positions,
    among the kept blocks, of the kept block just before and just after it (None at either end)."""

    start: int
    end: int
    before: int | None
    after: int | None


def removed_runs(removed: Sequence[int], n: int) -> list[Cut]:
    """The cuts a removal makes, first to last."""
    removed = sorted(set(removed))
    kept = [i for i in range(n) if i not in set(removed)]
    cuts, run = [], []
    for i in removed:
        if run and i != run[-1] + 1:
            cuts.append(run)
            run = []
        run.append(i)
    if run:
        cuts.append(run)
    out = []
    for run in cuts:
        before = max((p for p, i in enumerate(kept) if i < run[0]), default=None)
        after = min((p for p, i in enumerate(kept) if i > run[-1]), default=None)
        out.append(Cut(run[0], run[-1], before, after))
    return out


@dataclass
class CutFit:
    """What was fitted for one cut: `kind` "scale", "map" or "none", the scale (or the map's summary), and why
    when it is not what the recipe asked for."""

    cut: Cut
    kind: str
    scale: float | None = None
    map: torch.Tensor | None = None
    note: str | None = None

    def describe(self) -> dict:
        described = {"removed": [self.cut.start, self.cut.end], "kind": self.kind}
        if self.scale is not None:
            described["scale"] = round(float(self.scale), 6)
        if self.map is not None:
            eye = torch.eye(self.map.shape[0], dtype=self.map.dtype)
            described["map_distance_from_identity"] = round(float((self.map - eye).norm() / eye.norm()), 6)
        if self.note:
            described["note"] = self.note
        return described


# ---------------------------------------------------------------------------------------------- the recipes
# A recipe fits one cut from what the stream looks like there: `entering` (the pruned model's stream entering
# the first kept block after the cut, [tokens, d]), `target` (the dense model's stream after the removed run)
# and, for maps, `mlp_out` (the MLP output of the last kept block before the cut). All float64.

@dataclass(frozen=True)
class Recipe:
    name: str
    kind: str  # "none", "scale", "map", or "stream" (a d x d map of the stream: hooks only, never folded)
    fit: Callable | None
    summary: str
    fallback: Callable | None = None  # the scale a map recipe uses where no map can be folded


def _prunecomp_scale(entering: torch.Tensor, target: torch.Tensor) -> float:
    """Prune&Comp: the mean over channels of the ratio of the channel's mean magnitude after the removed run
    (dense) to the one entering the cut."""
    ratio = target.abs().mean(0) / entering.abs().mean(0).clamp_min(1e-12)
    return float(ratio.mean())


def _token_norm_scale(entering: torch.Tensor, target: torch.Tensor) -> float:
    """The median over tokens of ||target|| / ||entering||: a per-token magnitude ratio that a few tokens with
    huge activations (the first token's, mostly) cannot dominate, unlike any mean over tokens."""
    ratio = target.norm(dim=1) / entering.norm(dim=1).clamp_min(1e-12)
    return float(ratio.median())


def _lstsq_map(mlp_out: torch.Tensor, rest: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ReplaceMe, least squares: T minimising ||mlp_out T + rest - target||^2 (closed form, float64)."""
    solution = torch.linalg.lstsq(mlp_out, target - rest, driver="gelsd").solution
    return solution


def _cosine_map(mlp_out: torch.Tensor, rest: torch.Tensor, target: torch.Tensor, *, steps: int = 200) -> torch.Tensor:
    """ReplaceMe, cosine: T minimising the mean cosine distance between mlp_out T + rest and target, from the
    least-squares solution, with Adam (float64)."""
    start = _lstsq_map(mlp_out, rest, target)
    T = start.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([T], lr=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            optimiser.zero_grad()
            predicted = mlp_out @ T + rest
            loss = 1 - torch.nn.functional.cosine_similarity(predicted, target, dim=1).mean()
            loss.backward()
            optimiser.step()
    return T.detach()


def hadamard(d: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of order d (float64), as a Kronecker product of Sylvester's order-2
    matrices and Paley's order q + 1 matrices (q a prime with q = 3 mod 4: 12, 20, 24, 44, ...), which
    covers the hidden sizes of common models (576 = 12 * 12 * 4, 4096 = 2^12, 3584 = 28 * 128, ...)."""
    factors, rest = [], d
    while rest % 2 == 0 and rest > 1 and not _paley_order(rest):
        rest //= 2
        factors.append(2)
    for order in sorted(_paley_orders(rest), reverse=True):
        while rest % order == 0 and rest > 1:
            rest //= order
            factors.append(order)
    while rest % 2 == 0 and rest > 1:
        rest //= 2
        factors.append(2)
    if rest != 1:
        raise LayershapError(f"no Hadamard matrix of order {d} can be built here (linearpatch needs one)")
    matrix = torch.ones(1, 1, dtype=torch.float64)
    for order in factors:
        matrix = torch.kron(matrix, _sylvester2() if order == 2 else _paley(order - 1))
    matrix = matrix / math.sqrt(d)
    if not torch.allclose(matrix @ matrix.T, torch.eye(d, dtype=torch.float64), atol=1e-9):
        raise LayershapError(f"the Hadamard matrix of order {d} came out wrong")
    return matrix


def _sylvester2() -> torch.Tensor:
    return torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q ** 0.5) + 1))


def _paley_order(m: int) -> bool:
    return m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3


def _paley_orders(m: int) -> list[int]:
    return [o for o in range(4, m + 1, 4) if m % o == 0 and _paley_order(o)]


def _paley(q: int) -> torch.Tensor:
    """Paley's construction I: with Q the Jacobsthal matrix of GF(q), S = [[0, 1], [-1, Q]] is skew and
    I + S is a Hadamard matrix of order q + 1."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    Q = torch.tensor([[chi[(j - i) % q] for j in range(q)] for i in range(q)], dtype=torch.float64)
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, Q
    return torch.eye(q + 1, dtype=torch.float64) + S


def _linearpatch(entering: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """LinearPatch: in the Hadamard basis (which spreads a few channels' massive activations over all), one
    scale per channel, the ratio of the channel's mean magnitude after the run (dense) to entering the cut;
    the patch is H diag(s) H^T, applied to the stream."""
    H = hadamard(entering.shape[1])
    scales = (target @ H).abs().mean(0) / (entering @ H).abs().mean(0).clamp_min(1e-12)
    return H @ torch.diag(scales) @ H.T


REPAIRS: dict[str, Recipe] = {}


def register_repair(recipe: Recipe) -> None:
    REPAIRS[recipe.name] = recipe


register_repair(Recipe("none", "none", None, "no repair: the pruned model as removal leaves it"))
register_repair(Recipe("prunecomp", "scale", _prunecomp_scale,
                       "Prune&Comp: one scale per cut, the channels' mean magnitude ratio, folded into the later "
                       "output projections"))
register_repair(Recipe("scale", "scale", _token_norm_scale,
                       "one scale per cut, the median per-token norm ratio (robust to massive activations), "
                       "folded into the later output projections"))
register_repair(Recipe("replaceme-lstsq", "map", _lstsq_map,
                       "ReplaceMe: a d x d least-squares map of the MLP output before each cut, folded into its "
                       "down projection", fallback=_prunecomp_scale))
register_repair(Recipe("linearpatch", "stream", _linearpatch,
                       "LinearPatch: a Hadamard-rotated per-channel scaling of the stream at each cut (H diag(s) H^T); "
                       "no weight absorbs it exactly, so it is measured with a hook and not saved"))
register_repair(Recipe("replaceme-cosine", "map", _cosine_map,
                       "ReplaceMe: a d x d cosine-distance map of the MLP output before each cut, folded into its "
                       "down projection", fallback=_prunecomp_scale))


def repair_names() -> list[str]:
    return list(REPAIRS)


def recipe_for(name: str) -> Recipe:
    if name == "auto":
        return REPAIRS[DEFAULT_REPAIR]
    try:
        return REPAIRS[name]
    except KeyError:
        raise LayershapError(f"unknown --repair {name!r}; choose auto or one of {', '.join(REPAIRS)}") from None


DEFAULT_REPAIR = "scale"  # what the repair race supports (docs/benchmarks.md, "The repair race")


def resolve_repair(model, name: str, granularity: str = "block", *, streamed: bool = False) -> tuple[str, str | None]:
    """`auto` (prune's default): the default recipe where it folds exactly into this model, else none, with
    the reason; any other name as given."""
    if name != "auto":
        return name, None
    if granularity != "block":
        return "none", "no repair: sublayer plans are not repaired"
    if streamed:
        return "none", "no repair: a streamed model's kept blocks are copied from its shards unchanged"
    if model.config.model_type not in WRITERS:
        return "none", f"no repair: it cannot be folded exactly into a {model.config.model_type} model"
    return DEFAULT_REPAIR, None


def check_repairable(model, name: str, granularity: str = "block") -> Recipe:
    """The recipe, refused in one line where it cannot be folded exactly into this model."""
    recipe = recipe_for(name)
    if recipe.kind == "none":
        return recipe
    if recipe.kind == "stream":
        raise LayershapError(f"--repair {name} multiplies the residual stream by a d x d matrix, which no weight of "
                             "the model absorbs exactly (the norms of later blocks do not commute with it), so the "
                             "saved model would need an extra layer; use --repair scale, prunecomp or replaceme-*")
    if granularity != "block":
        raise LayershapError("--repair works on whole-block plans; use --repair none with --granularity sublayer")
    model_type = model.config.model_type
    if model_type not in WRITERS:
        raise LayershapError(f"--repair {name} cannot yet be folded exactly into a {model_type} model (it needs "
                             f"blocks that write the stream only through o_proj and down_proj: "
                             f"{', '.join(sorted(WRITERS))}); use --repair none")
    return recipe


# --------------------------------------------------------------------------------------------- fitting
class _Stop(Exception):
    """Raised by a capture hook once everything a fit needs has been seen, to skip the rest of the pass."""


def _submodule(block, dotted: str):
    module = block
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@contextmanager
def _installed(blocks, fits: list[CutFit]):
    """The fitted corrections as hooks on the (skipped) model: a scale multiplies the stream entering block
    `after`; a map multiplies the MLP output of block `before`."""
    handles = []
    for fit in fits:
        if fit.kind == "scale":
            scale = float(fit.scale)
            handles.append(blocks[fit.cut.after].register_forward_pre_hook(
                _on_hidden(lambda hidden, scale=scale: hidden * scale), with_kwargs=True))
        elif fit.kind == "stream":
            def patch(hidden, P=fit.map):
                return (hidden.double() @ P.to(hidden.device)).to(hidden.dtype)

            handles.append(blocks[fit.cut.after].register_forward_pre_hook(_on_hidden(patch), with_kwargs=True))
        elif fit.kind == "map":
            mlp = _submodule(blocks[fit.cut.before], MLP_OUT)

            def post(module, args, output, T=fit.map):
                return (output.double() @ T.to(output.device)).to(output.dtype)

            handles.append(mlp.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _on_hidden(change):
    """A forward pre-hook that replaces a block's input hidden states (positional, `hidden_states=` or, in
    families that name it so, `hidden=`) by `change(hidden)`."""
    def hook(module, args, kwargs):
        if args:
            return (change(args[0]), *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else "hidden"
        return args, {**kwargs, key: change(kwargs[key])}

    return hook


def _capture(model, tokens: torch.Tensor, batch_size: int, hooks: list[tuple[object, str, Callable]]) -> None:
    """Run `tokens` through the model batch by batch with capture hooks installed; a hook may raise `_Stop`."""
    device = next(model.parameters()).device
    handles = []
    for module, kind, fn in hooks:
        if kind == "pre":
            handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            handles.append(module.register_forward_hook(fn, with_kwargs=True))
    try:
        with torch.inference_mode():
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        for handle in handles:
            handle.remove()


def _hidden_of(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _flat(chunks: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double().cpu()


@dataclass
class DenseStreams:
    """The dense model's streams on one set of tokens: after each block `end` (flattened, float64: the targets
    a cut is fitted to) and entering each block `start` (per batch, as the model computed them: where a
    resumed fit starts, since the stream entering a plan's first cut is the dense one)."""

    targets: dict[int, torch.Tensor]
    entering: dict[int, list[torch.Tensor]] = field(default_factory=dict)


def dense_streams(model, ends, tokens: torch.Tensor, batch_size: int, cost: Cost | None = None, *,
                  starts=()) -> DenseStreams:
    """The dense model's stream after every block in `ends` and entering every block in `starts` (each at
    most the last end), in one pass that stops after the last end."""
    blocks = block_list(model)
    ends = sorted(set(ends))
    seen: dict[int, list] = {end: [] for end in ends}
    entering: dict[int, list] = {start: [] for start in sorted(set(starts))}
    hooks = []
    for start, chunks in entering.items():
        def grab_in(module, args, kwargs, chunks=chunks):
            chunks.append(_hidden_of(args, kwargs).detach())

        hooks.append((blocks[start], "pre", grab_in))
    for end in ends:
        def grab(module, args, kwargs, output, end=end):
            seen[end].append((output[0] if isinstance(output, (tuple, list)) else output).detach())
            if end == ends[-1]:
                raise _Stop

        hooks.append((blocks[end], "post", grab))
    _capture(model, tokens, batch_size, hooks)
    if cost is not None:
        cost.add(int(tokens.numel()), ends[-1] + 1)
    return DenseStreams({end: _flat(chunks) for end, chunks in seen.items()}, entering)


def _resumed(model, run: list[int], states: list[torch.Tensor], tokens: torch.Tensor, batch_size: int, *,
             to_head: bool = False):
    """Run only the blocks `run` (original indices, consecutive among the kept ones) with `states` (per batch)
    put in place of the input of `run[0]`: the stream after `run[-1]` per batch, or, `to_head`, the mean NLL
    through the final norm and head. The model's own forward pass does it, so masks and rotary embeddings are
    built as in the plain path (`game/prefix.py` resumes the same way) and the results are the plain path's
    bit for bit."""
    blocks = block_list(model)
    feed = iter(states)  # block run[0] is entered once per batch, in order
    inject = _on_hidden(lambda _hidden: next(feed))
    out: list[torch.Tensor] = []

    def grab(module, args, kwargs, output):
        out.append((output[0] if isinstance(output, (tuple, list)) else output).detach())
        raise _Stop

    with keep_only(model, run):
        if to_head:
            handle = blocks[run[0]].register_forward_pre_hook(inject, with_kwargs=True)
            try:
                return mean_nll(model, tokens, batch_size=batch_size)
            finally:
                handle.remove()
        _capture(model, tokens, batch_size, [(blocks[run[0]], "pre", inject), (blocks[run[-1]], "post", grab)])
    return out


def _pruned_activations(model, cut: Cut, tokens: torch.Tensor, batch_size: int, with_mlp: bool):
    """With the cut's blocks (and the plan's others) skipped and the earlier corrections hooked in: the stream
    entering the cut (input of block `after`, or what the final norm receives when the run ends the stack)
    and, for maps, the MLP output of block `before` and the stream before that MLP's addition."""
    blocks = block_list(model)
    entering, mlp_outs = [], []
    hooks = []
    if with_mlp:
        def grab_mlp(module, args, kwargs, output):
            mlp_outs.append(output.detach())

        hooks.append((_submodule(blocks[cut.before], MLP_OUT), "post", grab_mlp))
    if cut.after is not None:
        def grab_in(module, args, kwargs):
            entering.append(_hidden_of(args, kwargs).detach())
            raise _Stop

        hooks.append((blocks[cut.after], "pre", grab_in))
    else:
        def grab_out(module, args, kwargs, output):
            entering.append((output[0] if isinstance(output, (tuple, list)) else output).detach())
            raise _Stop

        hooks.append((blocks[len(blocks) - 1], "post", grab_out))
    _capture(model, tokens, batch_size, hooks)
    return _flat(entering), (_flat(mlp_outs) if with_mlp else None)


@dataclass
class Repair:
    """A fitted repair: the recipe, one `CutFit` per cut, and what fitting it cost."""

    recipe: str
    fits: list[CutFit] = field(default_factory=list)
    tokens: int = 0
    cost: Cost = field(default_factory=Cost)
    seconds: float = 0.0
    calibration: dict | None = None
    touched: list[dict] = field(default_factory=list)

    def describe(self) -> dict:
        return {"recipe": self.recipe, "cuts": [f.describe() for f in self.fits], "tokens": self.tokens,
                "cost": asdict(self.cost), "seconds": round(self.seconds, 2),
                "calibration": self.calibration, "touched": self.touched}


def fit_repair(model, removed: Sequence[int], tokens: torch.Tensor, recipe_name: str, *,
               batch_size: int = 8, dense: DenseStreams | None = None, resume: bool = True) -> Repair:
    """Fit `recipe_name` for removing `removed` (original block indices) from the dense `model`, cut by cut,
    on `tokens` ([windows, seq_len]). The model is left as it was (nothing folded yet: `fold_repair`).

    dense: the dense streams `dense_streams` returns, when several plans are fitted on the same tokens (then
    their pass is not counted here). `cost` counts token-passes as the game does (one token through one
    block; these passes stop at the cut and never run the head). resume: a scale or stream recipe resumes
    from the stream at each cut instead of running from the first block again (`fit_and_judge`); the fits are
    the same bit for bit, the plain path (`resume=False`) is what the tests compare it with."""
    return fit_and_judge(model, removed, tokens, recipe_name, batch_size=batch_size, dense=dense, judge=False,
                         resume=resume)[0]


def fit_and_judge(model, removed: Sequence[int], tokens: torch.Tensor, recipe_name: str, *, batch_size: int = 8,
                  dense: DenseStreams | None = None, judge: bool = True, resume: bool = True
                  ) -> tuple[Repair, float | None]:
    """`fit_repair`, and (`judge`) the mean NLL of `tokens` under the repaired model, counted in the repair's
    cost. For a scale or stream recipe on a model whose blocks take a cached input (`prefix_sharing`), each
    cut resumes from the corrected stream of the one before (the first from the dense stream entering the
    plan's first removed block) and the judgement from the last cut's, so a plan costs its kept blocks after
    its first cut once instead of once per cut and again for the judgement."""
    recipe = recipe_for(recipe_name)
    started = time.perf_counter()
    n = len(block_list(model))
    removed = normalise_layer_list(removed, n)
    repair = Repair(recipe.name, tokens=int(tokens.numel()))
    if not removed:
        return repair, None
    cuts = removed_runs(removed, n)
    keep = [i for i in range(n) if i not in set(removed)]
    resumable = (resume and recipe.kind in ("none", "scale", "stream") and architecture_of(model).prefix_sharing
                 and cuts[0].after is not None)
    if recipe.kind == "none" and not (judge and resumable):
        nll = _plain_judgement(model, removed, repair, tokens, batch_size) if judge else None
        return repair, nll
    if dense is None:
        ends = [cuts[0].start] if recipe.kind == "none" else [c.end for c in cuts]
        dense = dense_streams(model, ends, tokens, batch_size, repair.cost,
                              starts=[cuts[0].start] if resumable else ())
    if resumable and cuts[0].start not in dense.entering:
        raise ValueError(f"dense streams lack the stream entering block {cuts[0].start} (give it in starts=)")
    nll = None
    if resumable:
        nll = _fit_resumed(model, recipe, cuts, keep, tokens, batch_size, dense, repair, judge)
    else:
        _fit_plain(model, recipe, cuts, keep, tokens, batch_size, dense, repair)
    if judge and nll is None:
        nll = _plain_judgement(model, removed, repair, tokens, batch_size)
    repair.seconds = time.perf_counter() - started
    return repair, nll


def _fit_cut(recipe: Recipe, cut: Cut, entering: torch.Tensor | None, mlp_out: torch.Tensor | None,
             target: torch.Tensor) -> CutFit:
    """One cut's fit from its activations (see the recipes above)."""
    fit = CutFit(cut, "none")
    if mlp_out is not None:
        fit.kind, fit.map = "map", recipe.fit(mlp_out, entering - mlp_out, target)
    elif recipe.kind == "stream":
        fit.kind, fit.map = "stream", recipe.fit(entering, target)
    else:
        scale_fit = recipe.fit if recipe.kind == "scale" else recipe.fallback
        fit.kind, fit.scale = "scale", scale_fit(entering, target)
    if recipe.kind == "map" and cut.before is None:
        fit.note = "no kept block before this run: the map would need the (tied) embedding; scaled instead"
    return fit


def _unfitted(recipe: Recipe, cut: Cut) -> CutFit | None:
    """The fit of a cut that needs no activations: a run that ends the stack gets no scale."""
    use_map = recipe.kind == "map" and cut.before is not None
    if cut.after is None and not use_map:
        return CutFit(cut, "none", note="a scale before the final norm changes nothing" if recipe.kind != "stream"
                      else "a run that ends the stack: no kept block after it to patch the input of")
    return None


def _fit_plain(model, recipe, cuts, keep, tokens, batch_size, dense, repair) -> None:
    """Each cut from a pass from the first block, the earlier corrections hooked in."""
    with keep_only(model, keep):
        blocks = block_list(model)
        for cut in cuts:
            fit = _unfitted(recipe, cut)
            if fit is None:
                use_map = recipe.kind == "map" and cut.before is not None
                with _installed(blocks, repair.fits):
                    entering, mlp_out = _pruned_activations(model, cut, tokens, batch_size, use_map)
                repair.cost.add(int(tokens.numel()), cut.after if cut.after is not None else len(blocks))
                fit = _fit_cut(recipe, cut, entering, mlp_out, dense.targets[cut.end])
            repair.fits.append(fit)


def _corrected(fit: CutFit, hidden: torch.Tensor) -> torch.Tensor:
    """What `_installed`'s hook makes of the stream entering the block after the cut (the same operations)."""
    if fit.kind == "scale":
        return hidden * float(fit.scale)
    if fit.kind == "stream":
        return (hidden.double() @ fit.map.to(hidden.device)).to(hidden.dtype)
    return hidden


def _fit_resumed(model, recipe, cuts, keep, tokens, batch_size, dense, repair, judge) -> float | None:
    """Cut by cut, each from the stream the previous one left (see `fit_and_judge`); the judgement, if asked,
    from the last cut's corrected stream (None where the last run ends the stack: no block to resume into)."""
    states = dense.entering[cuts[0].start]  # = the pruned stream entering the first cut
    position = cuts[0].after  # the kept block whose input `states` is
    for j, cut in enumerate(cuts if recipe.kind != "none" else []):  # none: judged from the first cut on
        fit = _unfitted(recipe, cut)
        if fit is not None:  # the last run ends the stack
            repair.fits.append(fit)
            return None
        fit = _fit_cut(recipe, cut, _flat(states), None, dense.targets[cut.end])
        repair.fits.append(fit)
        states = [_corrected(fit, hidden) for hidden in states]
        if j + 1 < len(cuts):
            run = keep[cut.after:cuts[j + 1].before + 1]
            states = _resumed(model, run, states, tokens, batch_size)
            repair.cost.add(int(tokens.numel()), len(run))
            position = cuts[j + 1].after
    if not judge or position is None:
        return None
    run = keep[position:]
    nll = _resumed(model, run, states, tokens, batch_size, to_head=True)
    repair.cost.add(int(tokens.numel()), len(run) + 1)
    return nll


def _plain_judgement(model, removed, repair: Repair, tokens: torch.Tensor, batch_size: int) -> float:
    with repaired(model, removed, repair):
        nll = mean_nll(model, tokens, batch_size=batch_size)
    repair.cost.add(int(tokens.numel()), len(block_list(model)) - len(removed) + 1)
    return nll


@contextmanager
def repaired(model, removed: Sequence[int], repair: Repair):
    """Run the model with the plan's blocks skipped and the repair hooked in (not folded): for measuring a
    repair on many plans without editing weights."""
    n = len(block_list(model))
    keep = [i for i in range(n) if i not in set(normalise_layer_list(removed, n))]
    with keep_only(model, keep), _installed(block_list(model), repair.fits):
        yield


# --------------------------------------------------------------------------------------------- folding
@dataclass(frozen=True)
class TensorEdit:
    """One weight a repair changes, in the pruned model: `weight <- factor * T^T weight` (T = `map`, or the
    identity), for the Linear `module` of kept block `block`."""

    block: int
    module: str
    factor: float = 1.0
    map: torch.Tensor | None = None


def tensor_edits(repair: Repair, n_kept: int, writers: Sequence[str]) -> list[TensorEdit]:
    """What folding `repair` changes: a cut's scale divides the writers of block `after` and every later one;
    a map goes into the down projection of block `before`."""
    factors = [1.0] * n_kept
    maps: dict[int, torch.Tensor] = {}
    for fit in repair.fits:
        if fit.kind == "scale":
            for p in range(fit.cut.after, n_kept):
                factors[p] /= float(fit.scale)
        elif fit.kind == "map":
            maps[fit.cut.before] = fit.map.to(torch.float64)
    edits = []
    for p in range(n_kept):
        for name in writers:
            mapping = maps.get(p) if name == MLP_OUT else None
            if factors[p] != 1.0 or mapping is not None:
                edits.append(TensorEdit(p, name, factors[p], mapping))
    return edits


def fold_repair(model, repair: Repair) -> list[dict]:
    """Fold the fitted corrections into the weights of the model with the plan's blocks already removed (block
    positions are the kept blocks' positions, as `Cut.before`/`after` count them). Returns the touched
    tensors, by their names in the model's state dict, with the factor and map applied (also kept in
    `repair.touched`)."""
    if not repair.fits or all(f.kind == "none" for f in repair.fits):
        return []
    if any(f.kind == "stream" for f in repair.fits):
        check_repairable(model, repair.recipe)  # refuses, saying why
    model_type = model.config.model_type
    writers = WRITERS.get(model_type)
    if writers is None:
        raise LayershapError(f"a repair cannot be folded into a {model_type} model; use --repair none")
    arch = architecture_of(model)
    blocks = block_list(model)
    touched = []
    with torch.no_grad():
        for edit in tensor_edits(repair, len(blocks), writers):
            linear = _submodule(blocks[edit.block], edit.module)
            weight = linear.weight.data.double()
            bias = linear.bias.data.double() if linear.bias is not None else None
            if edit.map is not None:
                weight = edit.map.T @ weight
                bias = bias @ edit.map if bias is not None else None
            linear.weight.data = (weight * edit.factor).to(linear.weight.dtype)
            if bias is not None:
                linear.bias.data = (bias * edit.factor).to(linear.bias.dtype)
            entry = {"tensor": f"{arch.blocks}.{edit.block}.{edit.module}.weight", "factor": edit.factor}
            if edit.map is not None:
                entry["map"] = list(edit.map.shape)
            touched.append(entry)
    repair.touched = touched
    return touched
