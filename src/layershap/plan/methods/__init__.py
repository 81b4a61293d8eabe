"""Pruning methods, registered by name; each takes (model, calibration windows, k) and returns a `Plan`.

Adding a method is one entry in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable

from layershap.errors import LayershapError
from layershap.plan.methods._common import tokens_of
from layershap.plan.methods.angular import angular
from layershap.plan.methods.base import Cost, Plan
from layershap.plan.methods.cooperative_game import shapley
from layershap.plan.methods.last import last
from layershap.plan.methods.loo import loo
from layershap.plan.methods.magnitude import magnitude
from layershap.plan.methods.random_layers import random_layers
from layershap.plan.methods.shapiq_estimators import kadd, kernelshap, permutation, stratified, svarm
from layershap.plan.methods.shortgpt import shortgpt
from layershap.plan.methods.sleb import sleb
from layershap.plan.methods.taylor import taylor

METHODS: dict[str, Callable[..., Plan]] = {
    "shapley": shapley,
    "shortgpt": shortgpt,
    "angular": angular,
    "loo": loo,
    "taylor": taylor,
    "sleb": sleb,
    "magnitude": magnitude,
    "random": random_layers,
    "last": last,
    "kernelshap": kernelshap,
    "permutation": permutation,
    "stratified": stratified,
    "svarm": svarm,
    "kadd": kadd,
}


def get_method(name: str) -> Callable[..., Plan]:
    try:
        return METHODS[name]
    except KeyError:
        raise LayershapError(f"unknown method {name!r}; use one of {', '.join(METHODS)}") from None


def select_layers(method: str, model, windows, k: int, **options) -> Plan:
    """Run a registered method: which k blocks to remove. A plan without a `cost` gets one from its forward
    passes, each counted as a pass of the full model (marked `estimated`)."""
    plan = get_method(method)(model, windows, k, **options)
    if plan.cost is None:
        plan.cost = Cost.full_passes(plan.forward_passes, int(tokens_of(windows).numel()), plan.n_layers,
                                     estimated=plan.forward_passes > 0)
    return plan
