"""lm-eval task definitions (YAML) for offline zero-shot evaluation, with their data loaders (utils.py)."""
