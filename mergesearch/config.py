"""The configuration schema: the one place that reads what the user wrote.

A config is YAML validated by pydantic; unknown keys and wrong types are refused with the
field's path. ``mergesearch schema`` prints the JSON schema. Relative paths are taken
relative to the config file's folder (models, task folders, data files), except the run
folder and storage files, which are relative to the working directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergesearch.errors import ConfigError
from mergesearch.files import load_yaml
from mergesearch.recipe import DTYPES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- models ------------------------------------------------------------------------------


class Models(_Strict):
    base: str = Field(description="Base model: a folder, a hub id, or demo:base")
    sources: dict[str, str] = Field(
        description="Fine-tuned models made from the base, by a short name (alias: folder, "
                    "hub id or demo:<skill>)")
    dtype: str | None = Field(None, description="dtype of the live candidate model (default: as stored)")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the model folders")

    @field_validator("sources", mode="before")
    @classmethod
    def _list_to_dict(cls, v: Any) -> Any:
        if isinstance(v, list):
            return source_aliases([str(s) for s in v])
        return v

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one source model is needed")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str | None) -> str | None:
        if v is not None and v.removeprefix("torch.") not in DTYPES:
            raise ValueError(f"expected one of {', '.join(DTYPES)}")
        return v


def source_aliases(refs: list[str]) -> dict[str, str]:
    """Short names for sources given as a list: each folder's name, as before, and where
    two names are equal the shortest path suffix that tells them apart, in characters
    that Optuna parameter names and the space's ``a+b`` pairs can carry
    (``/x/exp-a/final`` -> ``exp-a_final``). A model is never dropped for a shared name."""
    dup = next((r for r in refs if refs.count(r) > 1), None)
    if dup is not None:
        raise ValueError(f"{dup} is listed twice")
    parts = {r: [p for p in re.split(r"[/\\]", r) if p] or [r] for r in refs}
    named = {r: Path(r).name or r for r in refs}
    aliases: dict[str, str] = {}
    for ref in refs:
        rivals = [r for r in refs if r != ref and named[r] == named[ref]]
        if not rivals:
            aliases[ref] = named[ref]  # unchanged, so that existing studies keep their names
            continue
        suffix = next((parts[ref][-k:] for k in range(1, len(parts[ref]) + 1)
                       if all(parts[r][-k:] != parts[ref][-k:] for r in rivals)), None)
        if suffix is None:
            raise ValueError(f"{ref} and {rivals[0]} have no distinct alias; "
                             "give the sources as a mapping alias: folder")
        aliases[ref] = re.sub(r"[^A-Za-z0-9_-]+", "_", "_".join(suffix))
    seen: dict[str, str] = {}
    for ref, alias in aliases.items():
        if alias in seen:
            raise ValueError(f"{seen[alias]} and {ref} have no distinct alias; "
                             "give the sources as a mapping alias: folder")
        seen[alias] = ref
    return {alias: ref for ref, alias in aliases.items()}


# ---- search space -----------------------------------------------------------------------

Bound = Union[bool, float, list[float], list[bool]]


class Space(_Strict):
    methods: dict[str, dict[str, Bound]] = Field(
        default_factory=lambda: {"task_arithmetic": {}, "ties": {}, "dare_ties": {}},
        description="Methods to search (a list of names, or name -> knob overrides)")
    params: dict[str, Bound] = Field(
        default_factory=dict,
        description="Knob overrides for every method: a value fixes the knob, [low, high] bounds it")
    layer_groups: int = Field(1, ge=1, description="Per-layer values in this many groups of layers (1: one value for all)")
    layer_mode: Literal["piecewise", "smooth"] = Field(
        "piecewise", description="piecewise: constant within a group; smooth: anchors interpolated over depth")
    split_attn_mlp: bool = Field(False, description="Separate values for attention and MLP tensors")
    per_layer: list[str] = Field(default_factory=lambda: ["weight", "density"],
                                 description="Which per-model knobs vary over layers")
    lines: bool = Field(False, description="Also search a LiNeS layer schedule (alpha, beta) "
                        "on the merged task vector of every method with a base model")
    shared: bool = Field(False, description="One value of each per-model knob for all sources "
                         "(weight, density, ...) instead of one per source: fewer dimensions; "
                         "linear's base keeps its own weight, and methods that normalise the "
                         "weights (nuslerp, multislerp) then weigh the sources evenly")

    @field_validator("methods", mode="before")
    @classmethod
    def _methods_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {m: {} for m in v}
        return v

    @field_validator("methods")
    @classmethod
    def _some(cls, v: dict[str, dict[str, Bound]]) -> dict[str, dict[str, Bound]]:
        # Names and knobs are checked against the registry by `spaces.check_space`.
        if not v:
            raise ValueError("at least one method is needed")
        return v


# ---- objectives ---------------------------------------------------------------------------


class DatasetSpec(_Strict):
    path: str = Field(description="datasets.load_dataset path: 'json', 'text', 'parquet' or a hub id")
    name: str | None = None
    data_files: str | list[str] | dict[str, str | list[str]] | None = None
    split: str = "train"
    text_field: str = "text"


class Objective(BaseModel):
    """One objective: its name, the evaluator that scores it and the direction. Every other
    key is the evaluator's own option (declared by its ``Options``): kept here as given and
    checked against the evaluator by `mergesearch.evaluators.check_objectives`."""

    model_config = ConfigDict(extra="allow")

    name: str
    evaluator: str = Field("lm_eval", description="lm_eval, perplexity, cost, a registered evaluator, or "
                                                   "'package.module:Class' for your own Evaluator subclass; "
                                                   "its options are the objective's other keys (see "
                                                   "$defs.<evaluator>_options)")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: the evaluator's (maximize for lm_eval, minimize for perplexity and cost)")

    @field_validator("name")
    @classmethod
    def _name_charset(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", v):
            raise ValueError(f"{v!r} may only use letters, digits, '_', '.', '-'")
        return v


class LmEvalSettings(_Strict):
    include_path: list[str] = Field(default_factory=list, description="Folders of custom task YAMLs")
    include_defaults: bool = Field(True, description="Index lm-eval's built-in tasks too (~4 s per worker)")
    allow_unsafe_code: bool = Field(False, description="Allow tasks that execute model-written code")

    @field_validator("include_path", mode="before")
    @classmethod
    def _one(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class Fisher(_Strict):
    """Calibration data for Fisher-weighted averaging (the ``fisher`` method)."""

    dataset: DatasetSpec | None = Field(
        None, description="A `datasets` dataset of texts (default: the objectives' own examples)")
    examples: int = Field(64, ge=1, description="Calibration examples per model")
    seq_len: int = Field(256, ge=2, description="Tokens per example, at most")


class Fidelity(_Strict):
    """Multi-fidelity scoring: every candidate is first scored on a subset of each
    objective's examples, and on all of them only if it could still enter the front."""

    enabled: bool = Field(False, description="Score candidates on a subset first")
    fraction: float = Field(0.25, gt=0, lt=1, description="Share of each objective's examples in the first pass")
    margin: float = Field(2.0, ge=0, description="Standard errors added to a first-pass score "
                                                 "before asking whether the front dominates it")


# ---- study, sampler, budget, workers -----------------------------------------------------


class Study(_Strict):
    name: str = "mergesearch"
    storage: str | None = Field(None, description="Optuna storage URL (default: SQLite in the run folder); "
                                                  "journal:PATH for a journal file")
    run_dir: str | None = Field(None, description="Run folder (default: runs/<name>)")


class Sampler(_Strict):
    name: str | None = Field(None, description="nsga2, nsga3, tpe, gp, random, cmaes or a registered sampler "
                                                "(default: tpe)")
    seed: int = 0
    population_size: int | None = Field(None, ge=2, description="NSGA population (default: max(16, 2 x workers))")
    n_startup_trials: int | None = Field(
        None, ge=0, description="Trials TPE and GP draw at random before modelling the results "
        "(default: a tenth of budget.n_trials, 5 to 10); warm-start trials count among them")
    # Off by default: on the SmolLM2 family (a pretrained base) these recipes lose the base's
    # knowledge and cost TPE its lead over random search (benchmarks/RESULTS.md).
    warm_start: bool = Field(False, description="Score first the recipes a person would try first "
                             "(each source alone, uniform task arithmetic, TIES at density 0.5), "
                             "so the sampler learns from them; only on a new study; false: the sampler alone")


class Budget(_Strict):
    n_trials: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0, description="Seconds")

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.n_trials is None and self.timeout is None:
            raise ValueError("n_trials or timeout is needed")
        return self


class Workers(_Strict):
    count: int = Field(1, ge=1)
    gpus_per_worker: float = Field(
        0, ge=0, description="GPUs each worker takes: below 1, a share of one GPU (its memory "
        "shared with the other workers on it); above 1, a whole number, over which the worker "
        "shards its live model by whole layers")
    cpus_per_worker: float = Field(1, gt=0)
    address: str | None = Field(None, description="Address of an existing Ray cluster to join (else a local one)")
    max_retries: int = Field(2, ge=0, description="Times a trial is retried when its worker dies")
    object_store_memory: int | None = Field(None, description="Bytes, for a local Ray")
    dashboard_host: str = "127.0.0.1"
    cache_gb: float | None = Field(
        None, ge=0, description="GiB a CPU worker may spend keeping what it derives from the task "
        "vectors (magnitude ranks, random numbers) across candidates; default: twice the "
        "weights, at most 40% of the memory available")
    device_memory_gb: float | None = Field(
        None, gt=0, description="GiB of its device a worker may use (of each of its GPUs, where it has "
        "several): the live model, work buffers, the inputs kept there and what is kept across "
        "candidates; default: 90% of the free GPU memory, or on a CPU the host budget (the "
        "device is the host)")
    host_memory_gb: float | None = Field(
        None, gt=0, description="GiB of host memory a worker may use for inputs kept off the device "
        "(pinned on a GPU); what fits in neither budget is read from the safetensors files on "
        "demand; default: 80% of the memory available at start")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        # Sharing is of one GPU: a worker cannot take one GPU and part of another.
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"{v:g} GPUs: above 1, a whole number of GPUs (the live model is sharded "
                             "over them); a fraction only below 1 (a share of one GPU)")
        return v


class Config(_Strict):
    models: Models
    space: Space = Field(default_factory=Space)
    objectives: list[Objective]
    heldout: list[Objective] = Field(default_factory=list, description="Objectives scored on demand (eval, export), not optimised")
    lm_eval: LmEvalSettings = Field(default_factory=LmEvalSettings)
    fisher: Fisher = Field(default_factory=Fisher)
    fidelity: Fidelity = Field(default_factory=Fidelity)
    study: Study = Field(default_factory=Study)
    sampler: Sampler = Field(default_factory=Sampler)
    budget: Budget = Field(default_factory=lambda: Budget(n_trials=50))
    workers: Workers = Field(default_factory=Workers)
    seed: int = Field(0, description="Seed of random merge methods (DARE, DELLA)")

    # Where relative paths are resolved; not part of the schema.
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _cross(self) -> Config:
        names = [o.name for o in self.objectives + self.heldout]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup:
            raise ValueError(f"objectives: the name {dup!r} is used twice")
        if not self.objectives:
            raise ValueError("objectives: at least one objective is needed")
        if self.sampler.name == "cmaes" and len(self.objectives) > 1:
            raise ValueError("sampler.name: cmaes handles a single objective; use nsga2, nsga3, tpe, gp or random")
        if self.sampler.name is None:
            self.sampler.name = "tpe"  # benchmarks/RESULTS.md, "Search quality"
        return self

    # ---- derived values --------------------------------------------------------------

    @property
    def run_dir(self) -> Path:
        """The run folder; relative to the working directory, like the command's outputs."""
        return Path(self.study.run_dir or f"runs/{self.study.name}").expanduser().resolve()

    @property
    def storage_url(self) -> str:
        if self.study.storage:
            url = os.path.expandvars(self.study.storage)  # keep passwords out of the file
            if url.startswith("journal:"):
                return "journal:" + str(Path(url.removeprefix("journal:").removeprefix("//")).resolve())
            if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
                return "sqlite:///" + str(Path(url.removeprefix("sqlite:///")).resolve())
            return url
        return f"sqlite:///{self.run_dir / 'study.db'}"

    @property
    def population_size(self) -> int:
        return self.sampler.population_size or max(16, 2 * self.workers.count)

    def path(self, p: str | Path) -> Path:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (self.root / p).resolve()

    def include_paths(self) -> list[str]:
        return [str(self.path(p)) for p in self.lm_eval.include_path]

    def snapshot(self) -> dict[str, Any]:
        """The config as stored on the study: JSON-safe, passwords masked."""
        data = self.model_dump(mode="json")
        data["study"]["run_dir"] = str(self.run_dir)
        if data["study"]["storage"]:
            data["study"]["storage"] = mask_password(self.storage_url)
        data["root"] = str(self.root)
        return data


def mask_password(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db, and a password
    given as a query parameter (``?password=secret``, as libpq accepts) likewise.

    A password may hold '@', '/', ':' or '?': it runs from the first ':' after the user to
    the last '@' before the query string, so a stray '@' hides too much, never too little."""
    user = re.match(r"[\w+.-]+://[^:/?#]*:", url)
    first_at = url.find("@", user.end()) if user else -1
    if first_at >= 0:
        query = re.search(r"[?#]", url[first_at:])
        host_at = url.rfind("@", first_at, first_at + query.start() if query else len(url))
        url = url[:user.end()] + "***" + url[host_at:]
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.IGNORECASE)


def load_config(path: str | Path) -> Config:
    path = Path(path)
    data = load_yaml(path, "config", ConfigError)
    return parse_config(data, source=str(path), root=path.resolve().parent)


def parse_config(data: dict[str, Any], source: str = "config", root: Path | None = None) -> Config:
    data = {k: v for k, v in data.items() if k != "root"}
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {format_validation_error(e)}") from None
    cfg.root = root or Path.cwd()
    return cfg


def format_validation_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required"
    if loc and re.match(r"^[\w\[\]-]+(\.[\w\[\]-]+)*: ", msg):
        return f"{loc}.{msg}"  # a model validator naming a field below its own
    return f"{loc}: {msg}" if loc else msg

