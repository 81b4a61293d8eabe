"""Models: loading (hub id, directory, GGUF, the embedded default), the architecture registry, skipping and
removing blocks, tracing hidden states, and saving a pruned model that loads with plain transformers."""
