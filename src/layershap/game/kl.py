"""KL(dense || pruned) of the next-token distribution, the loss of `--utility kl`.

At every predicted position the dense (full) model's next-token distribution p is held compactly: its
`KL_TOP_K` most likely tokens' log-probabilities and indices, and the log of the remaining mass as one more
outcome (the "rest" bucket). A pruned model's distribution q is coarsened the same way, onto p's top-k
tokens and the rest: its top-k log-probabilities are gathered from its log-softmax, and its rest is the
logsumexp of the log-softmax over every other token (the top-k entries set to -inf), so no probability is
ever got by subtracting from 1. The loss is the KL divergence between these two (k + 1)-outcome
distributions, averaged over the predicted positions.

Coarsening can only lose information, so this is a lower bound of the full-vocabulary KL(p || q) (the log-sum
inequality); with k at least the vocabulary it is the exact KL. The full model's own value is exactly 0:
its log-probabilities are computed by the same code from the same logits.

The dense reference is measured once per game: one full-model pass over the calibration windows, batch by
batch with the game's batch size, kept in float32 on the model's device. It takes `tokens x (k x 8 + 4)` bytes
(float32 values, int32 indices, one float32 rest per position): 0.5 MiB for 8 windows of 128 tokens,
whatever the model. Each evaluation then costs one log-softmax over the vocabulary, a gather, a scatter and
a logsumexp on top of the forward pass (benchmarks/kl_utility.py measures it beside the NLL).

The reference is keyed by the windows it was measured on: a short hash of each window's token ids (as the
store's context hashes the calibration tokens, `game/context.py`), and every batch is checked against it, so
other windows of the same shape are refused instead of being scored against the wrong distributions.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from layershap.errors import LayershapError

# The dense model's most likely tokens kept per position; the rest of its mass is one bucket.
KL_TOP_K = 64


def log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """Next-token log-probabilities, float32, at every position but each window's last: [batch, seq_len - 1,
    vocab]."""
    logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
    return torch.log_softmax(logits, dim=-1, dtype=torch.float32)


def coarsen_(logp: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the tokens in `index`, log of the mass of all other tokens). Overwrites `logp`
    (the tokens in `index` become -inf), so no second vocabulary-sized tensor is made."""
    top = logp.gather(-1, index)
    logp.scatter_(-1, index, float("-inf"))
    return top, torch.logsumexp(logp, dim=-1)


def window_digests(tokens: torch.Tensor) -> tuple[str, ...]:
    """A short hash of each window's token ids (int64 bytes, so the dtype a caller holds them in is
    irrelevant): what a dense reference is keyed by. One host copy of the windows, a few microseconds."""
    rows = tokens.detach().to("cpu", torch.int64).numpy()
    return tuple(hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in rows)


def coarse_kl(p_top: torch.Tensor, p_rest: torch.Tensor, q_top: torch.Tensor, q_rest: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per position between two coarsened distributions given as log-probabilities (top [..., k],
    rest [...]); an outcome p gives no mass contributes 0, one that q gives none while p does gives inf."""
    p = torch.cat([p_top, p_rest.unsqueeze(-1)], dim=-1)
    q = torch.cat([q_top, q_rest.unsqueeze(-1)], dim=-1)
    prob = p.exp()
    return torch.where(prob > 0, prob * (p - q), torch.zeros_like(prob)).sum(dim=-1)


@dataclass
class DenseReference:
    """The dense model's coarsened next-token distributions over a game's windows, and the per-batch KL
    loss (`BatchLoss`, `game/nll.py`) of a model against them.

    top_logp: [windows, seq_len - 1, k] float32; top_index: the same shape, int32; rest_logp: [windows,
    seq_len - 1] float32; all on the model's device. windows: `window_digests` of the windows it was measured
    on; a batch whose windows hash otherwise is refused.
    """

    top_logp: torch.Tensor
    top_index: torch.Tensor
    rest_logp: torch.Tensor
    windows: tuple[str, ...]

    @property
    def k(self) -> int:
        return self.top_logp.shape[-1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.top_logp, self.top_index, self.rest_logp))

    def __call__(self, model, batch: torch.Tensor, start: int = 0) -> tuple[float, int]:
        """Summed KL (float64) over the batch's predicted positions, and how many positions that is; `start`
        is the index of the batch's first window."""
        rows = slice(start, start + batch.shape[0])
        if self.top_logp[rows].shape[:2] != (batch.shape[0], batch.shape[1] - 1) \
                or window_digests(batch) != self.windows[rows]:
            raise LayershapError(f"the windows {start} to {start + batch.shape[0] - 1} are not the ones the "
                                 f"KL's dense reference was measured on; measure a reference of these windows")
        q_top, q_rest = coarsen_(log_probs(model, batch), self.top_index[rows].long())
        kl = coarse_kl(self.top_logp[rows], self.rest_logp[rows], q_top, q_rest)
        return float(kl.sum(dtype=torch.float64)), kl.numel()


def dense_reference(model, tokens: torch.Tensor, *, batch_size: int = 8, k: int = KL_TOP_K) -> DenseReference:
    """The model's own coarsened distributions over `tokens` ([windows, seq_len]): one pass as it is now (the
    full model), batch by batch as `mean_loss` runs them, so its KL against itself is exactly 0."""
    device = next(model.parameters()).device
    tops, indices, rests = [], [], []
    with torch.inference_mode():
        for start in range(0, tokens.shape[0], batch_size):
            logp = log_probs(model, tokens[start:start + batch_size].to(device))
            index = logp.topk(min(k, logp.shape[-1]), dim=-1).indices
            top, rest = coarsen_(logp, index)
            tops.append(top)
            indices.append(index.to(torch.int32))
            rests.append(rest)
    return DenseReference(torch.cat(tops), torch.cat(indices), torch.cat(rests), window_digests(tokens))
