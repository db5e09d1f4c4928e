"""Out-of-core work on checkpoints larger than memory: streaming expert pruning and layer-wise observation."""

from moeprune.stream.layerwise import HiddenStore, default_device, observe_layerwise
from moeprune.stream.loader import WeightLoader
from moeprune.stream.rewrite import RewriteResult, parse_size, plan_rewrite, prune_checkpoint

__all__ = ["HiddenStore", "WeightLoader", "default_device", "observe_layerwise", "RewriteResult", "parse_size", "plan_rewrite", "prune_checkpoint"]
