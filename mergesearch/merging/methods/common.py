"""Knob declarations shared by several methods (declared once, reused by name)."""

from mergesearch.merging.registry import Param

WEIGHT = Param("weight", per_model=True, search=(0.0, 1.0))
DENSITY = Param("density", default=1.0, per_model=True, valid=(0.0, 1.0), search=(0.1, 1.0))
LAMBDA = Param("lambda", default=1.0, valid=(0.0, 10.0), search=(0.5, 1.5))
INT8_MASK = Param("int8_mask", default=False, type=bool)


def normalize(default: bool) -> Param:
    return Param("normalize", default=default, type=bool)


def rescale(default: bool) -> Param:
    return Param("rescale", default=default, type=bool)
