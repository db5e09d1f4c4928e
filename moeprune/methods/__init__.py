"""Compression methods as registered objects: each declares the statistics it needs and how it decides
and applies, and the pipeline dispatches on the object, never on a method-name string."""

from moeprune.methods.base import METHODS, Decision, Method, get_method, method_names
from moeprune.methods import keep_file, merging, reconstruct, scoring  # noqa: F401  (registration)

__all__ = ["METHODS", "Decision", "Method", "get_method", "method_names"]
