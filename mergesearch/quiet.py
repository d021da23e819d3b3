"""Library noise off while a worker sets up and scores: progress bars and chatter of
lm-eval, transformers, datasets and huggingface_hub.

Scoring one candidate runs lm-eval several times, and each run draws its own progress bars
(building requests, tokenising, running them) and logs its set-up; a search or
``mergesearch eval`` would print dozens of lines per candidate. Our own progress line
(the CLI's) is what the user reads; library errors still come through.

lm-eval passes ``disable=False`` to tqdm explicitly, so neither ``TQDM_DISABLE`` (read
once, at tqdm's import, and overridden by an explicit argument) nor the libraries' own
switches silence it: within the block every tqdm bar is created disabled. The bars of
transformers, datasets and huggingface_hub are tqdm subclasses, so that covers them too.
Everything is restored on leaving the block.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

LIBRARIES = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub", "accelerate")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """No progress bars, and only errors logged or warned by the libraries, in the block."""
    from tqdm import std

    loggers = [logging.getLogger(name) for name in LIBRARIES]
    levels = [logger.level for logger in loggers]
    shown_init = std.tqdm.__init__

    def disabled_init(self, *args, **kwargs):
        kwargs["disable"] = True
        shown_init(self, *args, **kwargs)

    std.tqdm.__init__ = disabled_init
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"(lm_eval|transformers|datasets|huggingface_hub)(\.|$)")
            yield
    finally:
        std.tqdm.__init__ = shown_init
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
