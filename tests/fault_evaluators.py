"""A user-defined evaluator (loaded by 'module:Class') that meets real faults on purpose,
for tests/test_faults.py. It scores a real number read from the live weights."""

from __future__ import annotations

import os
import signal

from flaky_evaluator import _WeightMean


class FaultyEvaluator(_WeightMean):
    """Runs out of host memory on `ties` candidates (an exabyte asked of the allocator,
    which refuses it with a MemoryError), scores +inf on `dare_ties` ones, and on `linear`
    ones is killed with SIGKILL, as the kernel's out-of-memory killer kills a process."""

    def measure(self, recipe):
        method = recipe.method if recipe else None
        if method == "ties":
            import numpy as np

            np.ones(2**60, dtype=np.uint8)  # an exabyte: the allocation itself fails
        if method == "dare_ties":
            return float("inf"), {}
        if method == "linear":
            os.kill(os.getpid(), signal.SIGKILL)
        return self.value(), {}
