"""Observation: calibration data, collectors and the statistics schema with its reductions."""

from moeprune.observe.collector import Collector
from moeprune.observe.run import observe
from moeprune.observe.stats import OPTIONAL_STATS, LayerStats, Observations, model_fingerprint

__all__ = ["Collector", "LayerStats", "OPTIONAL_STATS", "Observations", "model_fingerprint", "observe"]
