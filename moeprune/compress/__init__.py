"""Tensor surgery on loaded layers: pruning (slicing), merging and quantization arithmetic."""

from moeprune.models.keep import KeepPlan, validate_keep
from moeprune.compress.prune import load_keep_file, prune_experts

__all__ = ["KeepPlan", "load_keep_file", "prune_experts", "validate_keep"]
