"""moeprune: make Mixture-of-Experts LLMs smaller by observing, scoring and rewriting their experts."""

__version__ = "0.1.0"
__all__ = ["__version__"]
