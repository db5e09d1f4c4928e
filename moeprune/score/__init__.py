"""Scoring: statistics -> expert importance (pure scorers) and importance -> experts kept."""

from moeprune.score.scorers import SCORERS, score_layer
from moeprune.score.select import Selection, experts_to_keep, select_experts, super_experts

__all__ = ["SCORERS", "Selection", "experts_to_keep", "score_layer", "select_experts", "super_experts"]
