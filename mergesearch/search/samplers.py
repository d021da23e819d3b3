"""Optuna samplers by name, in the registry `SAMPLERS`. Samplers are not persisted: they are
built anew on resume (NSGA-II/III keep their generations in the storage).

A sampler is registered as a `SamplerSpec`: a factory ``build(config, seed)`` returning an
Optuna sampler, and what the search must know about it (``flat_space``). Add one with
``SAMPLERS.register(name, SamplerSpec(...))`` or the `sampler` decorator; a config can
also name a spec as ``sampler.name: package.module:attr``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna

from mergesearch.config import Config
from mergesearch.errors import ConfigError
from mergesearch.registry import Registry
from mergesearch.search.methodwise import methodwise_gp


@dataclass(frozen=True)
class SamplerSpec:
    """How to build a sampler, and ``flat_space``: whether it evolves only the dimensions
    every trial shares (Optuna's intersection search space), so that a study over several
    methods must sample all methods' knobs in every trial (see `needs_flat_space`)."""

    build: Callable[[Config, int], optuna.samplers.BaseSampler]
    flat_space: bool = False


SAMPLERS: Registry[SamplerSpec] = Registry("sampler")


def sampler(name: str, *, flat_space: bool = False):
    """Register the decorated ``build(config, seed)`` as the sampler called ``name``."""

    def register(build: Callable[[Config, int], optuna.samplers.BaseSampler]):
        SAMPLERS.register(name, SamplerSpec(build, flat_space))
        return build

    return register


@sampler("nsga2", flat_space=True)
def _nsga2(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=seed)


@sampler("nsga3", flat_space=True)
def _nsga3(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.NSGAIIISampler(population_size=config.population_size, seed=seed)


def startup_trials(config: Config) -> int:
    """Trials a model-based sampler (TPE, GP) draws at random before it models the results:
    ``sampler.n_startup_trials``, else a tenth of the trial budget, 5 to 10 (Optuna's 10
    spends a fifth of a 50-trial budget at random). Completed trials of any origin count,
    the warm start's enqueued recipes among them."""
    if config.sampler.n_startup_trials is not None:
        return config.sampler.n_startup_trials
    n_trials = config.budget.n_trials
    return 10 if n_trials is None else max(5, min(10, n_trials // 10))


@sampler("tpe")
def _tpe(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    # multivariate + group: a joint density over the knobs of each method (the space is
    # conditional on the method); constant_liar: trials in flight count as bad, so that
    # parallel workers are not handed the same region.
    # Experimental in Optuna's terms since 2.2-3.0; the warning would reach every user's run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials(config),
                                          multivariate=True, group=True, constant_liar=True)


@sampler("gp")
def _gp(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    # A GP per method, on that method's trials and knobs (log EHVI for several objectives,
    # log EI for one; batched over trials in flight), and TPE choosing the method: one GP
    # over every method's knobs (a flat space, ~50 dimensions on the demo) is worse than
    # random search there (mergesearch.search.methodwise).
    return methodwise_gp(seed, startup_trials(config))


@sampler("random")
def _random(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


@sampler("cmaes", flat_space=True)
def _cmaes(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    # Categorical knobs (the method) fall back to independent sampling under CMA-ES.
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def check_sampler(config: Config) -> SamplerSpec:
    """The spec of the config's sampler; `ConfigError` naming the known ones, before any
    work starts, where there is none of that name."""
    name = config.sampler.name
    try:
        spec = SAMPLERS.get(name, allow_import=True)
    except KeyError as e:
        raise ConfigError(f"sampler.name: {e.args[0]}") from None
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"sampler.name: cannot import {name!r} ({e})") from None
    if not isinstance(spec, SamplerSpec):
        raise ConfigError(f"sampler.name: {name!r} is not a SamplerSpec")
    return spec


def build_sampler(config: Config, offset: int = 0) -> optuna.samplers.BaseSampler:
    """The config's sampler, seeded ``sampler.seed + offset``."""
    return check_sampler(config).build(config, config.sampler.seed + offset)


def needs_flat_space(config: Config) -> bool:
    """Whether all methods' knobs are sampled in every trial: for a sampler that evolves
    only the shared dimensions, a study over several methods would otherwise evolve the
    method and draw every knob at random."""
    return check_sampler(config).flat_space and len(config.space.methods) > 1
