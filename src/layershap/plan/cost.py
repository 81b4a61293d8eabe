"""What choosing the blocks cost: forward passes and token-passes, used and paid (`Cost`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from layershap.estimate.budget import blocks_run


@dataclass
class Cost:
    """What choosing the blocks cost, in forward passes and in token-passes.

    A token-pass is one token through one block; the head (final norm and LM head) counts as one block, so a
    pass of the full n-block model over T tokens is T * (n + 1) token-passes, and a pass with only the kept
    blocks of a mask is T * (kept + 1). A backward pass counts as one more forward pass.

    `passes` and `token_passes` are what the method used: everything its choice rests on, whether measured
    now or served from the evaluation store. `paid_passes` and `paid_token_passes` are what this run measured
    (new only). On a cold store the two agree; a rerun on a warm store uses the same and pays less, so the
    used figures are the method's cost and mean the same on every store. `estimated`: the method counted
    only passes, and the token-passes assume every pass ran the full model.

    Sublayer masks (2n entries, `add_sublayer_masks`): an attention or an MLP sublayer counts as half a block
    (the two halves of a block as the whole block, so a sublayer mask that keeps or drops blocks whole costs
    what its block mask costs), the head as one block.
    """

    passes: int = 0
    token_passes: int = 0
    paid_passes: int = 0
    paid_token_passes: int = 0
    estimated: bool = False

    def add(self, tokens: int, blocks: int, *, paid: bool = True, passes: int = 1) -> None:
        """Count `passes` passes of `tokens` tokens through `blocks` block-equivalents (head included)."""
        self.passes += passes
        self.token_passes += passes * tokens * blocks
        if paid:
            self.paid_passes += passes
            self.paid_token_passes += passes * tokens * blocks

    def add_masks(self, masks, tokens: int, *, stored=frozenset()) -> None:
        """Count one pass per keep-mask (kept blocks plus the head), paid unless its key is in `stored`."""
        from layershap.game.store import mask_key

        for mask in masks:
            self.add(tokens, int(blocks_run(mask, len(mask))), paid=mask_key(mask) not in stored)

    def add_sublayer_masks(self, masks, tokens: int, *, stored=frozenset()) -> None:
        """Count one pass per 2n sublayer keep-mask: tokens x (kept sublayers / 2 + 1) token-passes (half a
        block per sublayer, one for the head), rounded up to a whole token-pass; paid unless its key is in
        `stored`."""
        from layershap.game.store import mask_key

        for mask in masks:
            token_passes = math.ceil(tokens * blocks_run(mask, len(mask) // 2))  # exact: a multiple of 1/2
            self.add(token_passes, 1, paid=mask_key(mask) not in stored)

    def include(self, other: Cost) -> None:
        """Add another cost (a step of the method that counted its own, e.g. the block plan it starts from)."""
        self.passes += other.passes
        self.token_passes += other.token_passes
        self.paid_passes += other.paid_passes
        self.paid_token_passes += other.paid_token_passes
        self.estimated = self.estimated or other.estimated

    @classmethod
    def full_passes(cls, passes: int, tokens: int, n_layers: int, *, estimated: bool = False) -> Cost:
        """`passes` passes of the full model over `tokens` tokens, all paid."""
        cost = cls(estimated=estimated)
        cost.add(tokens, n_layers + 1, passes=passes)
        return cost

    def full_size_passes(self, tokens: int, n_layers: int) -> float:
        """The used token-passes as a number of full-model passes over `tokens` tokens (the unit of --budget)."""
        return self.token_passes / (tokens * (n_layers + 1))
