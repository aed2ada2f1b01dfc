"""Weight sparsity: mask trees, pruning criteria and recipes, masked optimizer, reports."""

from sparsity.masks import (
    SCOPES,
    apply_masks,
    global_keep_masks,
    keep_mask,
    magnitude_masks,
    mask_sparsity,
    masks_from_scores,
    n_pruned,
    random_masks,
)
from sparsity.optim import MaskedState, masked, masks_from_state, state_masks
from sparsity.recipes import (
    PRUNE_METHODS,
    PruneMethod,
    parse_recipe,
    prune,
    prune_with_masks,
    register,
)
from sparsity.report import format_report, sparsity_report
from sparsity.rules import DEFAULT_RULES, PRUNE, check_sparsity, resolve

__all__ = [
    "DEFAULT_RULES", "PRUNE", "PRUNE_METHODS", "SCOPES", "MaskedState", "PruneMethod",
    "apply_masks", "check_sparsity", "format_report", "global_keep_masks", "keep_mask",
    "magnitude_masks", "mask_sparsity", "masked", "masks_from_scores", "masks_from_state",
    "n_pruned", "parse_recipe", "prune", "prune_with_masks", "random_masks",
    "register", "resolve", "sparsity_report", "state_masks",
]
