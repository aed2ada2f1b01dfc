"""Weight sparsity: masks, one-shot criteria (Wanda, SparseGPT, ...), structures, distributions,
training-time schedules (gradual, SET, RigL, GraNet, movement, PDP), masked optimizer, export;
attention sparsity: block layouts and selectors (`sparsity.attention`), KV-cache eviction
(`sparsity.eviction`) and LazyLLM token pruning (`sparsity.lazyllm`)."""

from sparsity.attention import (
    SALE,
    SELECTORS,
    HiP,
    TopK,
    attention_recall,
    causal_layout,
    delta_attention,
    global_layout,
    hip_layout,
    intersection,
    parse_selector,
    sale_layout,
    segment_layout,
    topk_layout,
    topk_recall,
    union,
    window_layout,
)
from sparsity.calibrated import owl_sparsities, prune_calibrated
from sparsity.distributions import erk_densities
from sparsity.dst import granet, rigl, set_training
from sparsity.eviction import H2O, POLICIES, SnapKV, StreamingLLM, parse_policy
from sparsity.export import compress
from sparsity.lazyllm import LazyLLM, lazy_generate, lazy_prefill, revive
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
from sparsity.oneshot import sparsegpt_layer, sparsegpt_prune, wanda_layer, wanda_mask
from sparsity.optim import MaskedState, masked, masks_from_state, state_masks
from sparsity.pdp import harden, pdp_loss, soft_mask
from sparsity.recipes import (
    PRUNE_METHODS,
    PruneMethod,
    parse_recipe,
    prune,
    prune_with_masks,
    register,
    shrink_recipe,
    structured_kwargs,
)
from sparsity.report import format_report, sparsity_report
from sparsity.rules import DEFAULT_RULES, PRUNE, check_sparsity, resolve
from sparsity.schedules import cubic_sparsity, polynomial_sparsity
from sparsity.structured import prune_structured, shrink, structured_masks
from sparsity.structures import block_mask, is_nm, nm_mask
from sparsity.training import gradual_magnitude, movement, training_masks

__all__ = [
    "cubic_sparsity", "granet", "gradual_magnitude", "harden", "movement", "pdp_loss",
    "polynomial_sparsity", "rigl", "set_training", "soft_mask", "training_masks",
    "DEFAULT_RULES", "PRUNE", "PRUNE_METHODS", "SCOPES", "MaskedState", "PruneMethod",
    "apply_masks", "block_mask", "check_sparsity", "compress", "erk_densities", "format_report",
    "global_keep_masks", "is_nm", "keep_mask", "magnitude_masks", "mask_sparsity", "masked",
    "masks_from_scores", "masks_from_state", "n_pruned", "nm_mask", "owl_sparsities",
    "parse_recipe", "prune", "prune_calibrated", "prune_structured", "prune_with_masks",
    "random_masks", "register", "resolve", "shrink", "shrink_recipe", "sparsegpt_layer",
    "sparsegpt_prune", "sparsity_report", "state_masks", "structured_kwargs",
    "structured_masks", "wanda_layer", "wanda_mask",
    "SALE", "SELECTORS", "HiP", "TopK", "attention_recall", "causal_layout", "delta_attention",
    "global_layout", "hip_layout", "intersection", "parse_selector", "sale_layout",
    "segment_layout", "topk_layout", "topk_recall", "union", "window_layout",
    "H2O", "POLICIES", "SnapKV", "StreamingLLM", "parse_policy",
    "LazyLLM", "lazy_generate", "lazy_prefill", "revive",
]
