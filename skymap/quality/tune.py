"""Tune the default pipeline to one real image by injection-recovery.

:func:`tune` searches the few knobs of :func:`skymap.pipeline.default_pipeline` that
change what the fit follows (the GCV smoothing guard, the masking thresholds, the
source-tracking test, or anything passed in ``space=``) for the lowest
injection score (:func:`skymap.quality.injection.injection_recovery`: ``track +
|leak|``) on the user's own image, within a time budget.

Choosing and reporting use different injections: candidates are ranked on the
injections of ``seed`` (the leaders also on those of ``seed + 2``), and the winner, the
defaults and the peers are then scored on those of ``seed + 1``, which the search never
saw, so the reported gain is not the one that was optimised.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from skymap._util import check_int
from skymap.quality.injection import (
    InjectionResult,
    evaluate_method,
    fit_background,
    prepare,
    results_table,
    table_rows,
)

__all__ = ["DEFAULT_BUDGET", "TuneResult", "default_space", "holds_up", "tune"]

log = logging.getLogger(__name__)

#: Seconds: a 1-Mpix image is tuned in under 3 minutes on a 2-core machine.
DEFAULT_BUDGET = 150.0
# A candidate must beat the best so far by this much (sigma, or this share of the best
# score) to replace it: smaller gains are within the trial-to-trial scatter.
_MARGIN = 0.005
_REL_MARGIN = 0.02
# default values of the built-in knobs, for the refining step (geometric steps around
# the coarse winner), where default_pipeline's signature does not give them
_DEFAULTS = {"gcv_inflation": 1.4, "high": 4.0, "low": 2.0}
# How many of the best candidates race the defaults on fresh choosing injections.
_RACE_LEADERS = 3


def _accepts(option: str, value: Any) -> bool:
    from skymap.background.pipeline import default_pipeline

    try:
        default_pipeline(np.zeros((64, 64)), **{option: value})
    except (TypeError, ValueError):
        return False
    return True


def _option_default(option: str, fallback: Any) -> Any:
    from skymap.background.pipeline import default_pipeline

    try:
        param = inspect.signature(default_pipeline).parameters.get(option)
    except (TypeError, ValueError):
        param = None
    return fallback if param is None or param.default is param.empty else param.default


def _source_size(image, mask) -> float | None:
    """The default pipeline's own ``max_source_size`` for this image, where it has that
    option (None where it does not)."""
    if image is None or not _accepts("max_source_size", 16.0):
        return None
    try:
        from skymap.background.scale import source_scale

        return float(source_scale(image, mask).max_source_size)
    except (ImportError, AttributeError, TypeError, ValueError) as err:
        log.info("tune: no measured max_source_size (%s); using an eighth of the frame", err)
        return float(max(16.0, max(np.shape(image)) / 8))


def default_space(image=None, mask=None) -> list[list[dict]]:
    """The built-in search space: a list of axes, each a list of alternatives to the
    defaults (option dicts for :func:`skymap.fit`) tried one axis at a time.

    * ``max_source_size`` half and twice the one the default pipeline measures on
      ``image`` (when the pipeline has that option and an image is given): the scale
      that separates sources (kept out) from sky (followed);
    * ``gcv_inflation`` 4 and 12 (default 1.4): a stiffer background, for images whose
      GCV smoothing follows stars and galaxy wings;
    * thresholds ``high``/``low`` 3/1.5 and 6/3 (default 4/2): deeper masks, or masks
      that do not run away on structured skies;
    * the source-tracking test off (``source_tracking=None``), for a sky whose structure
      sits where the sources are (a nebula and its young stars); with GCV also
      inflated 12 times once it finds the background following source light
      (``tracking_inflation=12``), for an image whose faint sources GCV still chases;
      or with the floor it raises capped at a sixteenth of the shorter side, not an
      eighth (``tracking_cap=0.0625``), for sky structure narrower than that among
      the masks.

    Examples
    --------
    >>> [len(axis) for axis in default_space()]
    [2, 2, 3]
    """
    axes = [
        [{"gcv_inflation": 4.0}, {"gcv_inflation": 12.0}],
        [{"high": 3.0, "low": 1.5}, {"high": 6.0, "low": 3.0}],
        [{"source_tracking": None}, {"tracking_inflation": 12.0}, {"tracking_cap": 0.0625}],
    ]
    size = _source_size(image, mask)
    if size is not None:
        axes.insert(0, [{"max_source_size": round(size * f, 1)} for f in (0.5, 2.0)])
    return axes


def _axes(space, image=None, mask=None) -> list[list[dict]]:
    if space is None:
        return default_space(image, mask)
    if isinstance(space, Mapping):
        axes = []
        for key, values in space.items():
            if isinstance(values, str) or not isinstance(values, Sequence) or not values:
                raise ValueError(
                    f"space[{key!r}] must be a non-empty list of values, got {values!r}"
                )
            axes.append([{key: v} for v in values])
        return axes
    if isinstance(space, Sequence) and space and all(isinstance(c, Mapping) for c in space):
        return [[dict(c) for c in space]]
    raise ValueError(
        "space must be None, a mapping {option: [values]} or a list of option dicts, "
        f"got {space!r}"
    )


def holds_up(tuned, default) -> bool:
    """Whether a tuned pipeline's held-back result beats the defaults' by the margin a
    candidate needs while choosing (2%, at least 0.005 sigma): :func:`tune` returns the
    defaults otherwise.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> holds_up(R(score=0.25), R(score=0.30)), holds_up(R(score=0.298), R(score=0.30))
    (True, False)
    """
    margin = max(_MARGIN, _REL_MARGIN * default.score)
    return bool(tuned.score < default.score - margin)


def _key(options: Mapping) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def _label(options: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "(defaults)"


@dataclass(frozen=True, kw_only=True, eq=False)
class TuneResult:
    """What :func:`tune` found.

    Attributes
    ----------
    pipeline : IterativeBackground
        The tuned pipeline for this image; ``pipeline.fit(image, mask)`` works, and
        :meth:`to_toml` writes it for ``skymap run --config``.
    config : dict
        The winning options of :func:`skymap.fit` (empty when the defaults won).
    table : astropy.table.Table
        Every candidate in the order tried: ``round``, ``options``, the mean
        ``track``, ``leak``, ``score`` (and its spread) on the choosing injections,
        ``seconds`` it took, ``status``.
    report : astropy.table.Table
        The held-back scores (:func:`~skymap.quality.injection.compare`'s table) of
        ``tuned``, ``default`` and the peers, on injections the search never saw.
    results : dict
        ``{name: InjectionResult}`` behind ``report`` (maps for plots).
    seed, report_seed : int
        Injection seeds for choosing and for reporting.
    seconds, budget : float
        Time taken and the budget; ``exhausted`` says whether the budget cut the
        search short.
    """

    pipeline: Any
    config: dict
    table: Any = field(repr=False)
    report: Any = field(repr=False)
    results: dict = field(repr=False)
    seed: int
    report_seed: int
    seconds: float
    budget: float
    exhausted: bool

    def held_back(self, name: str) -> float:
        """Held-back score of ``tuned``, ``default`` or a peer (NaN if it failed)."""
        for row in self.report:
            if row["method"] == name:
                return float(row["score"])
        raise KeyError(f"no method {name!r} in the report; have {list(self.report['method'])}")

    def to_dict(self) -> dict:
        """JSON-ready summary: the winning options, every candidate, the held-back
        scores."""

        return {
            "config": dict(self.config),
            "seed": self.seed,
            "report_seed": self.report_seed,
            "seconds": self.seconds,
            "budget": self.budget,
            "exhausted": self.exhausted,
            "noise_sigma": self.report.meta.get("noise_sigma"),
            "candidates": table_rows(self.table),
            "held_back": table_rows(self.report),
        }

    def to_toml(self) -> str:
        """The tuned pipeline as TOML (``skymap run --config`` reads it)."""
        from skymap.app import config as config_mod

        head = (
            f"# skymap tune: {_label(self.config)}\n"
            f"# held-back injection score: tuned {self.held_back('tuned'):.4f}, "
            f"default {self.held_back('default'):.4f} (pixel-noise sigma)\n"
        )
        return head + config_mod.dumps_toml(self.pipeline)

    def plot(self, *, figsize=(7, 3.5)):
        """Held-back scores of tuned, default and peers as bars (see
        :func:`~skymap.quality.injection.plot_comparison`)."""
        from skymap.quality.injection import plot_comparison

        return plot_comparison(self.report, figsize=figsize)


def _check_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        b = float("nan")
    if isinstance(budget, bool) or not (math.isfinite(b) and b > 0):
        raise ValueError(f"budget must be a positive number of seconds, got {budget!r}")
    return b


def _fewer_trials(wanted: int, cost_of, remaining: float, what: str) -> int:
    """The most trials (at most ``wanted``, at least 1) whose ``cost_of(n)`` seconds
    fit in ``remaining``."""
    n = int(wanted)
    while n > 1 and cost_of(n) > remaining:
        n -= 1
    if n < wanted:
        log.warning("tune: the budget pays for %d %s trial(s), not %d", n, what, wanted)
    return n


def tune(
    image,
    *,
    mask=None,
    error=None,
    space=None,
    budget: float = DEFAULT_BUDGET,
    kinds: Sequence[str] = ("sky", "galaxies"),
    n_trials: int = 2,
    report_trials: int = 2,
    race_trials: int = 2,
    seed: int = 0,
    peers: Mapping[str, Any] | None = None,
    callback: Callable[[dict], None] | None = None,
) -> TuneResult:
    """Tune :func:`skymap.fit`'s options to ``image`` by injection-recovery.

    Coarse to fine: the defaults, then each alternative of each axis of ``space`` on its
    own; then the winners of the axes together; then (built-in space only), for the
    numeric knobs that moved, a geometric step between the winner and the default and
    one beyond the winner; last, a race of the three best against the defaults on
    ``race_trials`` more trials. A candidate is ranked by its mean score on ``n_trials``
    trials of the injections of ``seed``, all kinds injected into one image per trial (one fit per
    trial; ``evaluate_method(..., together=True)``), and must beat the best so far by
    2% (at least 0.005 sigma). The winner must then beat the defaults by the same
    margin on the held-back injections too, or the defaults are returned
    (``table.meta["winner_confirmed"]``): a winner by the choosing trials' scatter alone
    does not generalise. The winner, the defaults and the peers are scored
    on ``report_trials`` trials of ``seed + 1``, each kind in its own fit, as
    :func:`~skymap.quality.injection.injection_recovery` does.

    Parameters
    ----------
    image, mask, error, kinds
        As for :func:`~skymap.quality.injection.injection_recovery`.
    space : optional
        None for :func:`default_space`; a mapping ``{option: [values]}`` of
        :func:`skymap.fit` options (one axis per option); or a list of option dicts
        (one axis).
    budget : float
        Seconds. The search starts no candidate it cannot finish, together with the
        final held-back scoring, within the budget (estimated from the candidates so
        far). The defaults' own evaluation always runs; when one fit is so slow that it
        alone would overrun the budget, ``report_trials`` and then ``n_trials`` are
        lowered (to one each at least; the table's ``meta`` says what was used).
    n_trials, report_trials : int
        Trials per candidate while choosing, and for the held-back report.
    race_trials : int
        Trials of the race (0: none): once the search is over, the three best
        candidates ahead of the defaults, and the defaults, are scored on this many
        more trials, on the injections of ``seed + 2``, and ranked on all their
        choosing trials together. A candidate that led by the scatter of its first
        trials falls back there: a small race (in the manner of successive halving)
        that spends trials on the leaders only.
    seed : int
        Injections for choosing (and ``seed + 2`` for the race); ``seed + 1`` for
        reporting.
    peers : mapping, optional
        ``{name: method}`` scored on the held-back injections; default: photutils and
        SEP, one and two passes (:func:`skymap.quality.peers.peers` without
        NoiseChisel). ``{}`` for none.
    callback : callable, optional
        Called with each candidate's table row (a dict) as it finishes; e.g. to drive a
        progress bar.

    Returns
    -------
    TuneResult

    Raises
    ------
    ValueError
        For a budget that is not a positive number of seconds, an unknown option in
        ``space``, and the input errors of ``injection_recovery``.

    Examples
    --------
    >>> rng = np.random.default_rng(1)
    >>> img = 10 + rng.normal(size=(96, 96))
    >>> res = tune(img, space={"high": [5.0]}, n_trials=1, report_trials=1, peers={}, budget=600)
    >>> [f"{r}: {o}" for r, o in zip(res.table["round"], res.table["options"], strict=True)]
    ['default: (defaults)', 'coarse: high=5.0', 'race: (defaults)', 'race: high=5.0']
    >>> res.pipeline.fit(img).background.shape
    (96, 96)
    """
    from astropy.table import Table

    from skymap.background.pipeline import default_pipeline

    t_start = time.perf_counter()
    budget = _check_budget(budget)
    n_trials = int(check_int("n_trials", n_trials))
    report_trials = int(check_int("report_trials", report_trials))
    race_trials = int(check_int("race_trials", race_trials, minimum=0))
    prep = prepare(image, mask=mask, error=error, kinds=kinds)
    axes = _axes(space, prep.image, prep.bad)
    for axis in axes:
        for options in axis:
            try:
                default_pipeline(prep.image, prep.bad, **options)
            except (TypeError, ValueError) as err:  # unknown option, or a bad value
                raise ValueError(f"space: {_label(options)}: {err}") from err
    seed, report_seed = int(seed), int(seed) + 1
    if peers is None:
        from skymap.quality.peers import peers as available

        peers = available(noisechisel_runs=False)

    rows: list[dict] = []
    seen: dict[tuple, float] = {}
    # key -> (options, choosing result) of every candidate scored
    found: dict[tuple, tuple] = {}
    best = {"options": {}, "score": math.inf, "base": None, "fit_seconds": math.nan}

    def run(options: dict, round_name: str, base=None) -> float:
        key = _key(options)
        if key in seen:
            return seen[key]
        t0 = time.perf_counter()
        row = {"round": round_name, "options": _label(options)}
        try:
            res, base = evaluate_method(
                prep,
                options,
                n_trials=n_trials,
                seed=seed,
                keep_maps=False,
                name=_label(options),
                together=True,
                base=base,
            )
        except ValueError as err:
            row.update(status=str(err).splitlines()[0][:200], score=math.nan)
            res = None
        else:
            found[key] = (dict(options), res)
            row.update(
                track=res.mean("track"),
                leak=res.mean("leak"),
                score=res.score,
                score_std=res.spread("score"),
                status="ok",
            )
            margin = max(_MARGIN, _REL_MARGIN * best["score"]) if rows else 0.0
            if res.score < best["score"] - margin:
                best.update(
                    options=dict(options), score=res.score, base=base, fit_seconds=res.seconds
                )
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        seen[key] = row["score"]
        log.info("tune: %s -> %s (%.1f s)", row["options"], row.get("score"), row["seconds"])
        if callback is not None:
            callback(dict(row))
        return row["score"]

    # the defaults first: the reference, and the cost of one fit, to which the numbers of
    # trials are fitted when the budget cannot pay for them
    try:
        default_base, t_fit = fit_background(prep, {}, name="(defaults)")
    except ValueError as err:
        raise ValueError(f"the default fit cannot be scored on this image: {err}") from err
    n_kinds = len(prep.kinds)

    def remaining() -> float:
        return budget - (time.perf_counter() - t_start)

    # that first fit also pays for loading the compiled kernels: an upper bound, used
    # for the choosing trials (plus one held-back trial each for defaults and winner)
    n_trials = _fewer_trials(
        n_trials, lambda n: t_fit * (n + 2 * n_kinds), remaining(), "choosing"
    )
    run({}, "default", base=default_base)
    if not math.isfinite(best["score"]):
        raise ValueError(f"the default fit cannot be scored on this image: {rows[0]['status']}")
    # the held-back report of the defaults and of a winner, at the measured cost per fit
    report_trials = _fewer_trials(
        report_trials, lambda r: best["fit_seconds"] * 2 * r * n_kinds, remaining(), "held-back"
    )
    held: dict[str, InjectionResult | str] = {}
    held["default"], _ = evaluate_method(
        prep, {}, n_trials=report_trials, seed=report_seed, base=default_base, name="default"
    )
    for name, method in peers.items():
        try:
            held[name] = evaluate_method(
                prep, method, n_trials=report_trials, seed=report_seed, name=name
            )[0]
        except ValueError as err:
            held[name] = str(err)

    exhausted = False

    def affordable() -> bool:
        nonlocal exhausted
        elapsed = time.perf_counter() - t_start
        per_candidate = float(np.mean([r["seconds"] for r in rows]))
        n_fits = report_trials * len(prep.kinds)
        final = n_fits * best["fit_seconds"] if best["options"] else 0.0
        # the final held-back run of a new winner costs about as much as a candidate
        final = max(final, n_fits * float(held["default"].seconds))
        if elapsed + per_candidate + final > budget:
            exhausted = True
        return not exhausted

    def race(trials: int) -> None:
        """The leaders and the defaults on ``trials`` more trials (``seed + 2``), ranked
        on all their choosing trials; ``best`` becomes the race's winner, or the
        defaults if none beats them by the margin. Its rows give track, leak and score
        over all those trials."""
        default_key = _key({})
        first = {k: res.score for k, (_, res) in found.items()}
        ahead = sorted((k for k in first if first[k] < first[default_key]), key=first.get)
        # The fits without injections of the defaults and of the best so far are kept;
        # the others' are made again (an image each would be kept otherwise).
        bases = {default_key: default_base, _key(best["options"]): best["base"]}
        pooled = {}
        for key in [default_key, *ahead[:_RACE_LEADERS]]:
            if key != default_key and not affordable():
                break
            options, res0 = found[key]
            t0 = time.perf_counter()
            res, base = evaluate_method(
                prep,
                options,
                n_trials=trials,
                seed=seed + 2,
                keep_maps=False,
                name=_label(options),
                together=True,
                base=bases.get(key),
            )
            bases[key] = base

            def pool(name, res0=res0, res=res):
                return (res0.mean(name) * n_trials + res.mean(name) * trials) / (n_trials + trials)

            pooled[key] = (res0.score * n_trials + res.score * trials) / (n_trials + trials)
            row = {"round": "race", "options": _label(options), "score": pooled[key]}
            row.update(track=pool("track"), leak=pool("leak"), status="ok")
            row.update(score_std=res.spread("score"), seconds=time.perf_counter() - t0)
            rows.append(row)
            if callback is not None:
                callback(dict(row))
        pick = min((k for k in pooled if k != default_key), key=pooled.get, default=None)
        if pick is None:
            return
        margin = max(_MARGIN, _REL_MARGIN * pooled[default_key])
        winner = pick if pooled[pick] < pooled[default_key] - margin else default_key
        options, res0 = found[winner]
        log.info("tune: the race keeps %s (%.3f)", _label(options), pooled[winner])
        best.update(
            options=dict(options), score=pooled[winner], base=bases[winner],
            fit_seconds=res0.seconds,
        )  # fmt: skip

    # coarse: one axis at a time
    winners = []
    for axis in axes:
        axis_best, axis_score = None, seen[_key({})]
        for options in axis:
            if not affordable():
                break
            s = run(dict(options), "coarse")
            if s < axis_score:
                axis_best, axis_score = options, s
        if axis_best is not None:
            winners.append(axis_best)
    # fine: the axes' winners together, then geometric steps of the numeric knobs
    if len(winners) > 1 and affordable():
        merged = {}
        for w in winners:
            merged.update(w)
        run(merged, "combine")
    defaults = {k: _option_default(k, v) for k, v in _DEFAULTS.items()}
    size = next((o["max_source_size"] for a in axes for o in a if "max_source_size" in o), None)
    if size is not None:
        defaults["max_source_size"] = 2 * size  # the axis is (measured / 2, measured x 2)
    for opt, d in defaults.items() if space is None else ():
        v = best["options"].get(opt)
        if not isinstance(v, float | int) or v == d or v <= 0:
            continue
        for factor in (math.sqrt(d / v), math.sqrt(v / d)):
            if not affordable():
                break
            cand = dict(best["options"])
            for o in defaults:
                # high and low move together, as they did on the coarse axis
                if o == opt or (o in ("high", "low") and opt in ("high", "low") and o in cand):
                    cand[o] = round(cand[o] * factor, 2)
            run(cand, "refine")

    if race_trials and best["options"] and affordable():
        race(race_trials)
    tuned = dict(best["options"])
    confirmed = True
    if tuned:
        held["tuned"] = evaluate_method(
            prep,
            tuned,
            n_trials=report_trials,
            seed=report_seed,
            base=best["base"],
            name="tuned",
        )[0]
        # A winner must hold up on injections it was not chosen on: with a trial or two
        # per candidate, the choosing scores carry the injections' own scatter, and a
        # candidate can win by it. One that does not beat the defaults on the held-back
        # injections too is not returned.
        if not holds_up(held["tuned"], held["default"]):
            log.warning(
                "tune: %s won on the choosing injections (%.3f) but not on the held-back "
                "ones (%.3f against the defaults' %.3f): keeping the defaults",
                _label(tuned), best["score"], held["tuned"].score, held["default"].score,
            )  # fmt: skip
            confirmed, tuned = False, {}
            held["tuned"] = held["default"]
    else:
        held["tuned"] = held["default"]
    order = ["tuned", "default", *[k for k in held if k not in ("tuned", "default")]]
    report = results_table({k: held[k] for k in order}, prep, report_seed)
    if exhausted:
        log.warning(
            "tune: the budget of %.0f s stopped the search after %d candidates", budget, len(rows)
        )
    names = ["round", "options", "track", "leak", "score", "score_std", "seconds", "status"]
    table = Table(
        rows=[[r.get(k, math.nan) for k in names] for r in rows],
        names=names,
        dtype=[str, str, float, float, float, float, float, str],
    )
    table.meta.update(
        {
            "noise_sigma": prep.sigma,
            "seed": seed,
            "n_trials": n_trials,
            "report_trials": report_trials,
            "race_trials": race_trials,
            "kinds": list(prep.kinds),
            "winner_confirmed": confirmed,
            "choosing_winner": _label(best["options"]),
        }
    )
    return TuneResult(
        pipeline=default_pipeline(prep.image, prep.bad, **tuned),
        config=tuned,
        table=table,
        report=report,
        results={k: v for k, v in held.items() if isinstance(v, InjectionResult)},
        seed=seed,
        report_seed=report_seed,
        seconds=time.perf_counter() - t_start,
        budget=budget,
        exhausted=exhausted,
    )
