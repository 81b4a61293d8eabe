"""Watch what enters and leaves every block during an ordinary forward pass.

Forward hooks on the blocks work for every registered architecture alike, whereas `output_hidden_states`
differs between families (some apply the final norm to the last entry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from layershap.models.layers import block_list


def _hidden(value) -> torch.Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


@contextmanager
def block_io(model, callback: Callable[[int, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
    """Call `callback(index, hidden_in, hidden_out)` for every block while the context is open."""
    handles = []
    for index, block in enumerate(block_list(model)):
        def hook(module, args, kwargs, output, index=index):
            hidden_in = args[0] if args else kwargs.get("hidden_states", kwargs.get("hidden"))
            callback(index, hidden_in, _hidden(output))

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def traced_pass(model, tokens: torch.Tensor, callback: Callable[[int, torch.Tensor, torch.Tensor], None], *,
                batch_size: int = 8) -> None:
    """One forward pass over `tokens` (`[windows, seq_len]`), batch by batch, with `callback` watching every
    block as in `block_io`: the whole of a one-pass method's work with the model."""
    device = next(model.parameters()).device
    with torch.inference_mode(), block_io(model, callback):
        for start in range(0, tokens.shape[0], batch_size):
            model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
