"""Held-out perplexity of a model on named texts: the number every run reports before and after pruning."""

from __future__ import annotations

from layershap._moved import moved_names
from layershap.data.windows import text_windows
from layershap.game.nll import perplexities_of


def perplexities(model, tokenizer, data: list[str], *, samples: int, seq_len: int, seed: int = 0,
                 split: str = "evaluation", batch_size: int = 8) -> dict[str, float]:
    """Perplexity on each named text (its `split` half), windows drawn with `seed`."""
    windows = {name: text_windows(name, tokenizer, samples=samples, seq_len=seq_len, seed=seed, split=split)
               for name in data}
    return perplexities_of(model, windows, batch_size=batch_size)


__getattr__ = moved_names("layershap.evaluate.perplexity", None,
                          {"mean_nll": "layershap.game.nll", "batch_nll": "layershap.game.nll"})
