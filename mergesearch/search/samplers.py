"""Optuna samplers by name. Samplers are not persisted: they are built anew on resume
(NSGA-II/III keep their generations in the storage)."""

from __future__ import annotations

import optuna

from mergesearch.config import Config


def build_sampler(config: Config, offset: int = 0) -> optuna.samplers.BaseSampler:
    s = config.sampler
    seed = s.seed + offset
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=seed)
    if s.name == "nsga3":
        return optuna.samplers.NSGAIIISampler(population_size=config.population_size, seed=seed)
    if s.name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True)
    if s.name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "cmaes":
        # Categorical knobs (the method) fall back to independent sampling under CMA-ES.
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    raise ValueError(f"sampler.name: unknown sampler {s.name!r}")  # guarded by the schema


def needs_flat_space(config: Config) -> bool:
    """Whether the sampler evolves only the dimensions every trial shares (Optuna's
    intersection search space): then all methods' knobs are sampled in every trial, or a
    study over several methods would evolve the method and draw every knob at random."""
    return config.sampler.name in ("nsga2", "nsga3", "gp", "cmaes") and len(config.space.methods) > 1
