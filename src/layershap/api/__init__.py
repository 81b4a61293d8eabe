"""The workflows the command line is built on, each a straight line through the stages: `prune_model`
(api/prune.py: choose -> remove -> quantize -> write, measured before and after), `estimate_run` and
`estimate_dry_run` (api/estimate.py: Shapley values only)."""

from layershap.api.estimate import estimate_dry_run, estimate_run
from layershap.api.prune import PruneSettings, PruneWindows, prune_model

__all__ = ["PruneSettings", "PruneWindows", "estimate_dry_run", "estimate_run", "prune_model"]
