"""Architectures as data: where experts live in each MoE family, routing rules and keep-plan rules."""

from moeprune.models.adapter import MoEAdapter, MoELayer, get_arch_spec, supported_model_types
from moeprune.models.archs import ARCHS
from moeprune.models.spec import ArchSpec, ExpertLayout, GateSpec

__all__ = ["ARCHS", "ArchSpec", "ExpertLayout", "GateSpec", "MoEAdapter", "MoELayer", "get_arch_spec",
           "supported_model_types"]
