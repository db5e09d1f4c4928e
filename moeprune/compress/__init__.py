"""Rewriting expert layers: pruning (slicing) and saving the result as a stock checkpoint."""

from moeprune.compress.prune import KeepPlan, load_keep_file, prune_experts, validate_keep
from moeprune.compress.save import save_compressed

__all__ = ["KeepPlan", "load_keep_file", "prune_experts", "save_compressed", "validate_keep"]
