"""What a user measures on a model: held-out perplexity on named texts, zero-shot accuracy (lm-eval), speed
and memory (bench), and methods side by side (compare)."""
