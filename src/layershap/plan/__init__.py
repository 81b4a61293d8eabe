"""From values or scores to the blocks to remove.

ratio     what --ratio means in blocks
methods/  every pruning method, registered by name (`METHODS`), each returning a `Plan`
search    removal plans a surrogate rates best, and single swaps around a plan
seeds     the cheap rivals' plans (ShortGPT, angular, leave-one-out) that seed the search
refine    measure the search's candidates on the real model and keep the best measured plan
"""
