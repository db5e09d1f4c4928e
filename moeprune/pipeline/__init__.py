"""The pipeline on top: recipe -> plan (before any weight is read) -> an executor -> report."""

from moeprune.pipeline.recipe import Recipe, apply_overrides, load_recipe
from moeprune.pipeline.run import get_observations, run_recipe

__all__ = ["Recipe", "apply_overrides", "get_observations", "load_recipe", "run_recipe"]
