"""Text in, token windows out: calibration and evaluation windows (`windows`) from local files, packaged
texts and hub datasets, and the offline zero-shot task pack (`tasks/`, lm-eval YAML)."""

from layershap._moved import moved_names

__getattr__ = moved_names("layershap.data", "layershap.data.windows")
