"""The layer game: a value function over keep-masks, and everything that makes measuring it cheap and exact.

layer_game  the value function (`LayerGame`) and the registered utilities
nll         mean next-token NLL and perplexity of token windows
kl          the mean KL from the dense model's next-token distribution (the loss of the `kl` utility)
prefix      prefix sharing: masks that share leading blocks resume from cached hidden states
context     the model fingerprint and measurement context that key stored evaluations
store       the SQLite evaluation store: every measurement committed once, never paid for twice
measure     `evaluate_masks`: read the store, measure the rest on the active backend, commit
backends/   where masks are measured: this process (local) or a Ray cluster

The game knows nothing of samplers, surrogates, Shapley values or plans.
"""

from layershap._moved import moved_names

__getattr__ = moved_names("layershap.game", "layershap.game.layer_game")
