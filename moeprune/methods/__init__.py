"""Compression methods as registered objects that declare their statistics, then decide and apply per layer."""

from moeprune.methods.base import METHODS, Decision, Method, get_method, method_names
from moeprune.methods import keep_file, merging, reconstruct, scoring  # noqa: F401  (registration)

__all__ = ["METHODS", "Decision", "Method", "get_method", "method_names"]
