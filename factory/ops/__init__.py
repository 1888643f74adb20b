"""LIV operators: one file per family, a registry that maps names to classes (see registry.py)."""

from factory.ops.base import Flops, LIVOperator, OpSpec, State
from factory.ops.registry import build_operator, families, family

__all__ = ["Flops", "LIVOperator", "OpSpec", "State", "build_operator", "families", "family"]
