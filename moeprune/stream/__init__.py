"""Out-of-core work on checkpoints larger than memory: streaming expert pruning and layer-wise observation."""

from moeprune.stream.rewrite import RewriteResult, parse_size, plan_rewrite, prune_checkpoint

__all__ = ["RewriteResult", "parse_size", "plan_rewrite", "prune_checkpoint"]
