"""The Shapley estimate: masks -> evaluations -> surrogate -> values.

sampling   keep-masks stratified by how many blocks they keep (registered samplers)
surrogate  models that predict a mask's utility from the measured ones (registered surrogates)
shapley    Shapley values of a value function: exact enumeration, or stratified sampling of a surrogate
pipeline   the estimate end to end, its settings and presets
"""

from layershap._moved import moved_names

__getattr__ = moved_names("layershap.estimate", "layershap.estimate.pipeline",
                          {"measurement_context": "layershap.game.context",
                           "evaluate_masks": "layershap.game.measure"})
