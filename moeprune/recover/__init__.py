"""Recovery after pruning or merging: logit KD, block-wise KD and the gate-scale choice."""

from moeprune.recover.router_kd import RouterKD, kd_loss, router_parameters, teacher_targets, trainable_parameters

__all__ = ["RouterKD", "kd_loss", "router_parameters", "teacher_targets", "trainable_parameters"]
