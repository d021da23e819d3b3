"""The Pareto front of a study, the choice of one point on it, hypervolume, and plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mergesearch.errors import StudyError

REFERENCES_ATTR = "mergesearch.references"


def objective_names(study: optuna.Study) -> list[str]:
    return study.metric_names or [f"objective_{i}" for i in range(len(study.directions))]


def maximize_mask(study: optuna.Study) -> np.ndarray:
    return np.array([d == optuna.study.StudyDirection.MAXIMIZE for d in study.directions])


def full_fidelity(trial: FrozenTrial) -> bool:
    """Scored on every example (multi-fidelity leaves some on a subset only)."""
    return trial.user_attrs.get("fidelity", 1.0) >= 1


def scored_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The COMPLETE trials scored at full fidelity, each recipe once (its first trial;
    later ones with the same recipe hash are duplicates told the same scores): what
    fronts, hypervolumes and plots use."""
    seen: set[str] = set()
    trials = []
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        h = t.user_attrs.get("recipe_hash")
        if not full_fidelity(t) or h in seen:
            continue
        if h is not None:
            seen.add(h)
        trials.append(t)
    return trials


def pareto_front(study: optuna.Study) -> list[FrozenTrial]:
    """The non-dominated full-fidelity trials (for one objective: the best ones)."""
    from optuna.study._multi_objective import _get_pareto_front_trials_by_trials

    trials = scored_trials(study)
    if not trials:
        return []
    return sorted(_get_pareto_front_trials_by_trials(trials, study.directions), key=lambda t: t.number)


def hypervolume(values: np.ndarray, reference: np.ndarray, maximize: np.ndarray) -> float:
    """Hypervolume dominated by ``values`` (rows: points) beyond ``reference``."""
    if len(values) == 0:
        return 0.0
    from optuna._hypervolume import compute_hypervolume  # Optuna's WFG implementation

    sign = np.where(maximize, -1.0, 1.0)
    loss, ref = values * sign, reference * sign
    loss = loss[(loss < ref).all(axis=1)]
    if len(loss) == 0:
        return 0.0
    return float(compute_hypervolume(loss, ref, assume_pareto=False))


def reference_point(study: optuna.Study) -> np.ndarray:
    """Per objective, the worst score among the base and the source models (when the
    study has them), else the worst score of any trial: hypervolume then measures the
    gain over the models one started from."""
    refs = study.user_attrs.get(REFERENCES_ATTR) or {}
    names = objective_names(study)
    maximize = maximize_mask(study)
    rows = [[r[n] for n in names] for r in refs.values() if all(n in r for n in names)]
    if not rows:
        rows = [t.values for t in scored_trials(study)]
    if not rows:
        return np.zeros(len(names))
    arr = np.array(rows, dtype=float)
    return np.where(maximize, arr.min(axis=0), arr.max(axis=0))


def kept_gains(study: optuna.Study, values: np.ndarray) -> np.ndarray:
    """Per point (rows of ``values``) and objective, the share of the best source's gain
    over the base that the point keeps (`gains_kept`), from the base's and sources' scores
    the study stores; all NaN for a study without them."""
    names = objective_names(study)
    values = np.asarray(values, dtype=float).reshape(-1, len(names))
    refs = study.user_attrs.get(REFERENCES_ATTR) or {}
    rows = {name: [r[n] for n in names] for name, r in refs.items() if all(n in r for n in names)}
    if "base" not in rows or len(rows) < 2:
        return np.full(values.shape, np.nan)
    base = rows.pop("base")
    return gains_kept(values, np.array(base), np.array(list(rows.values())), maximize_mask(study))


def gains_kept(values: np.ndarray, base: np.ndarray, sources: np.ndarray, maximize: np.ndarray) -> np.ndarray:
    """Per point (rows of ``values``) and objective, the share of the best source's gain
    over the base that the point keeps: 0 at the base's score, 1 at the best source's
    (directions taken into account). NaN where no source improves on the base (nothing to
    keep, e.g. a retention task). ``sources``: one row of scores per source."""
    sign = np.where(maximize, 1.0, -1.0)
    gain = (sources * sign).max(axis=0) - base * sign
    return np.where(gain > 0, (values * sign - base * sign) / np.where(gain > 0, gain, 1.0), np.nan)


def balance(study: optuna.Study, values: np.ndarray) -> np.ndarray:
    """Per point, its smallest kept gain (`kept_gains`) over the objectives some source
    improves on: how much of every source's skill a merge keeps at once. NaN where no
    objective has a gain to keep."""
    gains = kept_gains(study, values)
    skills = ~np.isnan(gains).all(axis=0)
    return gains[:, skills].min(axis=1) if skills.any() else np.full(len(gains), np.nan)


def most_balanced(study: optuna.Study, front: list[FrozenTrial]) -> tuple[FrozenTrial, float] | None:
    """The point of ``front`` with the highest `balance`, and its balance; None where the
    study cannot tell one."""
    if not front:
        return None
    kept = balance(study, np.array([t.values for t in front], dtype=float))
    if np.isnan(kept).all():
        return None
    i = int(np.nanargmax(kept))
    return front[i], float(kept[i])


def study_hypervolume(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> float:
    trials = trials if trials is not None else scored_trials(study)
    values = np.array([t.values for t in trials], dtype=float).reshape(-1, len(study.directions))
    return hypervolume(values, reference_point(study), maximize_mask(study))


def hypervolume_curve(study: optuna.Study, points: int = 40) -> list[tuple[int, float]]:
    """(scored trials, hypervolume of the first that many) at up to ``points`` evenly
    spaced counts, the last at every scored trial: whether a search is still improving.
    The reference point is the study's (`reference_point`), as in `study_hypervolume`."""
    trials = scored_trials(study)
    n = len(trials)
    if n == 0:
        return []
    counts = sorted({max(1, round(n * (i + 1) / points)) for i in range(points)} | {n})
    ref, maximize = reference_point(study), maximize_mask(study)
    values = np.array([t.values for t in trials], dtype=float).reshape(n, -1)
    return [(k, hypervolume(values[:k], ref, maximize)) for k in counts]


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One block character per value, from the lowest (▁) to the highest (█)."""
    if not values:
        return ""
    low, high = min(values), max(values)
    if high == low:
        return SPARKS[-1 if high > 0 else 0] * len(values)
    return "".join(SPARKS[round((v - low) / (high - low) * (len(SPARKS) - 1))] for v in values)


def choose(study: optuna.Study, *, trial: int | None = None, best: str | None = None,
           weights: dict[str, float] | None = None, balanced: bool = False) -> FrozenTrial:
    """One trial: by number, best on one objective, the most balanced front point (the
    highest `balance`), or the front point maximising the weighted sum of min-max
    normalised objectives (directions taken into account)."""
    names = objective_names(study)
    if trial is not None:
        try:
            t = study.trials[trial]
        except IndexError:
            raise StudyError(f"--trial: no trial {trial} (the study has {len(study.trials)})") from None
        if t.state != TrialState.COMPLETE:
            raise StudyError(f"--trial: trial {trial} is {t.state.name}, not COMPLETE")
        if not full_fidelity(t):
            raise StudyError(f"--trial: trial {trial} was scored on a subset of the examples only "
                             f"(fidelity {t.user_attrs['fidelity']:g})")
        return t
    front = pareto_front(study)
    if not front:
        raise StudyError("the study has no completed trial yet")
    values = np.array([t.values for t in front], dtype=float)
    sign = np.where(maximize_mask(study), 1.0, -1.0)
    if best is not None:
        if best not in names:
            raise StudyError(f"--best: unknown objective {best!r}; objectives: {', '.join(names)}")
        i = names.index(best)
        return front[int(np.argmax(values[:, i] * sign[i]))]
    if balanced:
        pick = most_balanced(study, front)
        if pick is None:
            raise StudyError("--balanced: no objective where a source beats the base (or the study "
                             "has no scores of the base and sources): nothing to balance")
        return pick[0]
    weights = weights or {n: 1.0 for n in names}
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise StudyError(f"--weights: unknown objective {unknown[0]!r}; objectives: {', '.join(names)}")
    lo, hi = values.min(axis=0), values.max(axis=0)
    norm = (values - lo) / np.where(hi > lo, hi - lo, 1.0)
    norm = np.where(sign > 0, norm, 1 - norm)
    w = np.array([weights.get(n, 0.0) for n in names])
    return front[int(np.argmax(norm @ w))]


def parse_weights(text: str) -> dict[str, float]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise StudyError(f"--weights: expected name=number, got {part!r}") from None
    return out


def front_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per front point: its scores, its `balance` (where the study can tell), its
    method and recipe hash."""
    names = objective_names(study)
    trials = pareto_front(study)
    balances = balance(study, np.array([t.values for t in trials], dtype=float))
    rows = []
    for t, kept in zip(trials, balances):
        recipe = t.user_attrs.get("recipe", {})
        rows.append({"trial": t.number, **dict(zip(names, t.values)),
                     **({} if np.isnan(kept) else {"balance": float(kept)}),
                     "method": recipe.get("method", "?"), "recipe_hash": t.user_attrs.get("recipe_hash")})
    return rows


def front_csv(study: optuna.Study) -> str:
    rows = front_rows(study)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def plot_front(study: optuna.Study, path: str | Path) -> Path:
    """A PNG of every trial, the front, and the base and source models marked.

    Two objectives: one scatter; more: a grid of pairwise scatters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = objective_names(study)
    done = scored_trials(study)
    if not done:
        raise StudyError("the study has no completed trial to plot")
    values = np.array([t.values for t in done], dtype=float)
    front_ids = {t.number for t in pareto_front(study)}
    on_front = np.array([t.number in front_ids for t in done])
    refs = study.user_attrs.get(REFERENCES_ATTR) or {}
    pairs = [(0, 1)] if len(names) == 2 else [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    if len(names) == 1:
        pairs = [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (i, j) in zip(axes[0], pairs):
        if i == j:
            ax.plot([t.number for t in done], values[:, i], ".", color="0.6", label="trials")
            ax.set_xlabel("trial")
            ax.set_ylabel(names[i])
        else:
            ax.scatter(values[~on_front, i], values[~on_front, j], s=12, color="0.7", label="trials")
            f = values[on_front]
            order = np.argsort(f[:, i])
            # a line only where the front is 2-D; with more objectives it is a projection
            style = "o-" if len(names) == 2 else "o"
            ax.plot(f[order, i], f[order, j], style, color="tab:blue", label="Pareto front")
            for k, (ref_name, ref) in enumerate(refs.items()):
                if names[i] in ref and names[j] in ref:
                    ax.scatter([ref[names[i]]], [ref[names[j]]], marker="*", s=160,
                               color=f"C{k + 1}", label=ref_name, zorder=5)
            ax.set_xlabel(names[i])
            ax.set_ylabel(names[j])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{study.study_name}: {len(done)} trials, {len(front_ids)} on the front")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
