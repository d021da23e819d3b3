"""Tiny offline experts to merge: the embedded demo problem (see `build_experts`)."""
