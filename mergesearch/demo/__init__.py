"""Tiny offline experts to merge: the embedded demo problem (see `build_experts`)."""

from mergesearch.demo.experts import build_experts, cache_dir, resolve_model
from mergesearch.demo.skills import SKILLS, examples, write_task_data

__all__ = ["SKILLS", "build_experts", "cache_dir", "examples", "resolve_model", "write_task_data"]
