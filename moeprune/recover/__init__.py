"""Recovery after pruning or merging: cheap training that keeps the stock checkpoint format."""

from moeprune.recover.router_kd import RouterKD, kd_loss, router_parameters, teacher_targets, trainable_parameters

__all__ = ["RouterKD", "kd_loss", "router_parameters", "teacher_targets", "trainable_parameters"]
