"""Convergence of the iterative pipeline: when a stage has settled, when its mask is
running away, and what the result says about it in words.

A stage has settled when the background moved by less than its tolerance and the mask
changed little (:func:`settled`). A *runaway* is a mask that keeps growing while the
background keeps moving: sky structure the fit cannot follow is masked, the fit then
follows it even less, and more of it is masked. :func:`runaway` detects it after
:data:`RUNAWAY_RUN` such iterations in a row; the pipeline then backs off to the state
before the growth began, or to where the stage was last converging if its growth
then turned and quickened (:func:`run_start`), the last in which mask and background
agreed, and stops there. A stage whose settled mask leaves a background change that
no longer shrinks, inside the fit's statistical error, has *stalled* (:func:`stalled`)
and stops too, as does one whose background has settled while its mask still creeps
(:func:`creeping`). A fit that stops at its iteration cap without settling emits a
:class:`ConvergenceWarning` whose message is ``BackgroundResult.convergence_note``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BACKED_OFF",
    "RUNAWAY_EXCESS",
    "RUNAWAY_RATIO",
    "RUNAWAY_RUN",
    "CREEP_RUN",
    "CYCLE_RUN",
    "FLICKER_RATIO",
    "FLICKER_RUN",
    "STALL_ERRORS",
    "STALL_RATIO",
    "SETTLED_STOPS",
    "STOPS",
    "ConvergenceWarning",
    "Landings",
    "creeping",
    "cycling",
    "flickering",
    "note_backed_off",
    "note_cycle",
    "note_flicker",
    "note_converged",
    "note_mask_settled",
    "note_creeping",
    "note_stopped",
    "note_stalled",
    "lands",
    "run_start",
    "runaway",
    "settled",
    "starts_run",
    "stalled",
    "tolerance",
    "turns",
    "wild_cycle",
]

#: The words of a note whose fit backed off a runaway (:func:`note_backed_off`).
BACKED_OFF = "backing off a runaway"

#: How a fit's last stage stopped (``BackgroundResult.stop``), the note's first words
#: as one: ``settled`` (:func:`settled`), ``mask_settled`` (the new mask changed too
#: little to refit), ``stalled``, ``creeping``, ``flicker`` (:func:`stalled`,
#: :func:`creeping`, :func:`flickering`: converged), ``cycle`` (a limit cycle resolved;
#: not converged when it jumped, :func:`wild_cycle`), ``backed_off`` (a runaway, gone
#: back to the state before it: converged, but the stage did not settle on its own) and
#: ``cap`` (the iteration cap: not converged).
STOPS = (
    "settled",
    "mask_settled",
    "stalled",
    "creeping",
    "flicker",
    "cycle",
    "backed_off",
    "cap",
)

#: The stops where the last stage's mask and background agreed on their own. After any
#: other (a stall, a creep, a flicker, a cycle, a back-off, the cap) the default options
#: are least sure of the frame: on 20 real images a tune (:func:`skymap.tune`) beat
#: them on unseen injections on 7 of the 11 whose fits stopped otherwise, and on 1 of
#: the 9 that settled (``benchmarks/README.md``, fourteenth wave).
SETTLED_STOPS = ("settled", "mask_settled")

#: Iterations in a row of mask growth with a moving background that make a runaway.
RUNAWAY_RUN = 3
#: ... when the background's change shrinks by less than this factor per iteration:
#: a fit converging geometrically by 0.5 per iteration gains a decade in ~3 more,
#: one at 0.8 needs ~10.
RUNAWAY_RATIO = 0.7
#: ... and when the background still moves by more than this many times its tolerance:
#: a mask deepening over faint extended sources moves it by little more than the
#: tolerance, and backing off would unmask them.
RUNAWAY_EXCESS = 3.0


#: Iterations in a row whose masked share grows and shrinks by turns that make a cycle.
CYCLE_RUN = 3

#: Iterations in a row whose background moved by less than its tolerance, at one floor,
#: while the mask still changed, that make a creep (:func:`creeping`).
CREEP_RUN = 2

#: Iterations in a row, at one floor, whose small background change no longer shrinks
#: while the masked share stays on a plateau, that make a flicker floor (:func:`flickering`).
FLICKER_RUN = 3
#: ... when the last change of the run is at least this fraction of its first: a stage
#: converging geometrically by 0.85 per iteration or faster loses more over the run.
FLICKER_RATIO = 0.8

#: A settled mask's background whose change shrank by less than this factor in the last
#: iteration has stalled: the change is the flicker of pixels at the thresholds.
STALL_RATIO = 0.85
#: ... and it is a stall only if both changes are inside this many statistical errors
#: of the fit (a change the data cannot tell from none).
STALL_ERRORS = 1.0


class ConvergenceWarning(UserWarning):
    """A background fit stopped at its iteration cap before settling; the result's
    ``convergence_note`` says why (how much the background and the mask still moved).

    Examples
    --------
    >>> import warnings
    >>> issubclass(ConvergenceWarning, UserWarning)
    True
    """


def tolerance(pipe: Any, rec: Any) -> float:
    """The change (in units of the background RMS) below which ``rec``'s background
    counts as settled: ``change_tol``, or ``error_tol`` times its statistical error if
    that is larger."""
    tol = pipe.change_tol
    if pipe.error_tol and math.isfinite(rec.error):
        tol = max(tol, pipe.error_tol * rec.error)
    return tol


def _mask_settled(pipe: Any, rec: Any) -> bool:
    """Fewer than ``mask_tol`` of the pixels changed mask state in ``rec``, or the
    masked share grew or shrank by less than that (a plateau)."""
    return rec.mask_change <= pipe.mask_tol or abs(rec.mask_growth) <= pipe.mask_tol


def _one_floor(records: Sequence[Any]) -> bool:
    """Whether ``records`` were all fitted at one smoothing floor (``min_scale``): a
    background that moved because the floor was raised (source tracking) is the
    estimator changing, which none of the tests here may read as the mask's doing."""
    return len({getattr(r, "min_scale", None) for r in records}) <= 1


def settled(pipe: Any, rec: Any) -> bool:
    """Whether the iteration ``rec`` meets the tolerances of ``pipe``: the background
    moved by less than :func:`tolerance` and fewer than ``mask_tol`` of the pixels
    changed mask state, or the masked share grew or shrank by less than that."""
    return rec.change <= tolerance(pipe, rec) and _mask_settled(pipe, rec)


def runaway(pipe: Any, records: Sequence[Any]) -> bool:
    """Whether the last :data:`RUNAWAY_RUN` of a stage's ``records`` each grew the
    masked share by more than ``mask_tol`` while the background moved by more than its
    tolerance, the background's change is not shrinking by at least
    :data:`RUNAWAY_RATIO` per iteration (a mask that grows while the fit converges
    geometrically is only getting deeper), the last change is still more than
    :data:`RUNAWAY_EXCESS` times its tolerance, and the run (and the record before it)
    was fitted at one smoothing floor (``min_scale``).

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    >>> grow = [R(mask_growth=0.03, change=c, error=0.0) for c in (0.3, 0.26, 0.23)]
    >>> settling = [R(mask_growth=0.03, change=c, error=0.0) for c in (0.3, 0.1, 0.03)]
    >>> runaway(pipe, grow), runaway(pipe, grow[:2]), runaway(pipe, settling)
    (True, False, False)
    """
    if len(records) < RUNAWAY_RUN:
        return False
    run = records[-RUNAWAY_RUN:]
    if not all(r.mask_growth > pipe.mask_tol and r.change > tolerance(pipe, r) for r in run):
        return False
    # A background that moved because its smoothing floor was raised (source tracking)
    # is the estimator changing, not the mask running away: the run must have been
    # fitted at one floor.
    if not _one_floor(records[-RUNAWAY_RUN - 1 :]):
        return False
    first, last = run[0].change, run[-1].change
    return last >= first * RUNAWAY_RATIO ** (len(run) - 1) and last > RUNAWAY_EXCESS * tolerance(
        pipe, run[-1]
    )


def starts_run(pipe: Any, rec: Any, previous: Any) -> bool:
    """Whether a runaway that grew through ``rec`` would back off to ``rec`` rather than
    further: it did not grow the masked share by more than ``mask_tol``, or its
    smoothing floor differs from ``previous``'s (a runaway is judged at one floor)."""
    if not rec.mask_growth > pipe.mask_tol:
        return True
    return not _one_floor((previous, rec))


def turns(pipe: Any, before: Any, rec: Any, after: Any) -> bool:
    """Whether a stage's growth turned at ``rec``: ``before``, ``rec`` and ``after``
    are iterations of one stage at one smoothing floor, ``rec`` grew the mask by less
    than ``before`` did, and ``after`` by more than ``mask_tol`` more than ``rec``.

    The stage was converging into ``rec`` and the growth quickened after it: a run
    that feeds itself began there. A growth that shrinks iteration after iteration
    while the background keeps moving has no such turn, and neither has a flat one.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(mask_tol=0.005)
    >>> def recs(*growths):
    ...     return [R(mask_growth=g, min_scale=8.0, stage=1) for g in growths]
    >>> turns(pipe, *recs(0.012, 0.008, 0.019)), turns(pipe, *recs(0.09, 0.05, 0.03))
    (True, False)
    >>> turns(pipe, *recs(0.012, 0.008, 0.011))  # quickened by less than mask_tol
    False
    """
    one = before.stage == rec.stage == after.stage and _one_floor((before, rec, after))
    return bool(
        one
        and rec.mask_growth < before.mask_growth
        and after.mask_growth > rec.mask_growth + pipe.mask_tol
    )


def lands(pipe: Any, rec: Any, previous: Any) -> bool:
    """Whether a back-off that walks back through ``rec`` stops there: ``rec`` started
    no run (:func:`starts_run`), or it and ``previous`` are iterations of one stage and
    ``rec`` grew the mask by less than ``previous`` did (the stage was converging into
    it). The comparison is within the stage: its first iteration's growth is over the
    previous stage's mask, made by another masker.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(mask_tol=0.005)
    >>> a, b, c = (R(mask_growth=g, min_scale=8.0, stage=1) for g in (0.09, 0.04, 0.05))
    >>> lands(pipe, b, a), lands(pipe, c, b), lands(pipe, b, R(stage=0, mask_growth=0.2,
    ...     min_scale=8.0))
    (True, False, False)
    """
    if starts_run(pipe, rec, previous):
        return True
    return rec.stage == previous.stage and rec.mask_growth < previous.mask_growth


def run_start(pipe: Any, records: Sequence[Any]) -> int:
    """Index in ``records`` (the state a stage started from, then its records) of the
    state a runaway found by :func:`runaway` backs off to.

    Without a turn in the stage's growth (:func:`turns`) after the growth began, that
    is the last record before the unbroken growth that ended in the run
    (:func:`starts_run`), at most the stage's start. With one, the stage had two
    regimes: it was converging, then the growth quickened and fed itself. The back-off
    then walks back from the last turn, or from before the last :data:`RUNAWAY_RUN`
    iterations if that is earlier, to the last record the stage was still converging
    into (:func:`lands`): a fit of a nearly equal image that did not run away keeps
    that deepening, which going back to the stage's start would throw away with the
    run. A growth that shrinks iteration after iteration while the background keeps
    moving has no turn: the whole stage is the run, wherever it was caught.

    Backing off to the state just before the last :data:`RUNAWAY_RUN` iterations
    regardless would land wherever the run happened to be caught, and two fits of
    nearly the same image, caught one iteration apart, would keep masks that differ by
    a whole iteration's growth.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(mask_tol=0.005)
    >>> def recs(*growths):
    ...     return [R(mask_growth=g, min_scale=8.0, stage=0 if i else -1)
    ...             for i, g in enumerate(growths)]
    >>> run_start(pipe, recs(0.0, 0.1, 0.1, 0.1, 0.1))  # unbroken growth: the start
    0
    >>> run_start(pipe, recs(0.0, -0.01, 0.08, 0.06, 0.05))  # the mask shrank at 1
    1
    >>> run_start(pipe, recs(0.0, 0.09, 0.04, 0.012, 0.008, 0.019))  # turned at 4
    2
    >>> run_start(pipe, recs(0.0, 0.16, 0.09, 0.05, 0.03, 0.02))  # no turn: the start
    0
    """
    j = len(records) - RUNAWAY_RUN - 1
    while j > 0 and not starts_run(pipe, records[j], records[j - 1]):
        j -= 1
    start = max(j, 0)
    turned = [
        m for m in range(start + 1, len(records) - 1) if turns(pipe, *records[m - 1 : m + 2])
    ]
    if not turned:
        return start
    j = min(len(records) - RUNAWAY_RUN - 1, turned[-1])
    while j > start and not lands(pipe, records[j], records[j - 1]):
        j -= 1
    return j


class Landings:
    """The masks of the states a runaway can back off to, kept as a fit's records are
    made, for a fit whose history keeps no masks (tiles): :func:`run_start` picks the
    state, and the mask must still be at hand then.

    Kept, by index in the history: the last record that started a run
    (:func:`starts_run`, or the state the stage started from), the stage's last turn
    of growth (:func:`turns`), the last record before the final :data:`RUNAWAY_RUN` at
    which :func:`run_start`'s walk back can stop (:func:`lands`), and any within them
    (a later run can land there).

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(mask_tol=0.005)
    >>> growths = (0.0, 0.09, 0.04, 0.012, 0.008, 0.019)
    >>> history = [R(mask_growth=g, min_scale=8.0, stage=0 if i else -1)
    ...            for i, g in enumerate(growths)]
    >>> kept = Landings(pipe)
    >>> kept.start(0, "mask 0")
    >>> for i in range(1, len(history)):
    ...     kept.add(history[: i + 1], f"mask {i}")
    >>> kept[run_start(pipe, history)]
    'mask 2'
    """

    def __init__(self, pipe: Any):
        self.pipe, self.masks, self.run, self.turn = pipe, {}, None, None

    def start(self, index: int, mask: Any) -> None:
        """A stage starts from the state ``index`` whose mask is ``mask``."""
        self.masks, self.run, self.turn = {index: mask}, index, None

    def add(self, history: Sequence[Any], mask: Any) -> None:
        """``history[-1]`` was just recorded, made with ``mask``."""
        i = len(history) - 1
        if i == 0 or starts_run(self.pipe, history[-1], history[-2]):
            self.run = i
        if i == self.run or lands(self.pipe, history[-1], history[-2]):
            self.masks[i] = mask
        if i > 1 and i - 1 in self.masks and turns(self.pipe, *history[-3:]):
            self.turn = i - 1
        before = [k for k in self.masks if k < len(history) - RUNAWAY_RUN]
        for k in before[:-1]:  # a later landing before the final run supersedes it
            if k not in (self.run, self.turn):
                del self.masks[k]

    def __getitem__(self, index: int) -> Any:
        return self.masks[index]


def cycling(pipe: Any, records: Sequence[Any]) -> bool:
    """Whether the last :data:`CYCLE_RUN` of a stage's ``records`` grew and shrank the
    masked share by turns, each by more than ``mask_tol``, while the background moved
    by more than its tolerance, with masks made from backgrounds fitted at one
    smoothing floor: a limit cycle between two masks, which more iterations do not
    resolve. A mask that grows and shrinks while the floor is being raised (source
    tracking) follows a changing estimator, as in :func:`runaway`.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(change_tol=0.01, error_tol=0.0, mask_tol=0.005)
    >>> rec = lambda g, floor=16.0: R(mask_growth=g, change=0.03, error=0.0, min_scale=floor)
    >>> flip = [rec(g) for g in (0.03, 0.02, 0.02, -0.01, 0.01)]
    >>> creep = [rec(g) for g in (0.03, 0.02, 0.02, 0.01, 0.01)]
    >>> raised = [rec(g, f) for g, f in zip((0.03, 0.02, 0.02, -0.01, 0.01), (16, 32, 64, 64, 64))]
    >>> cycling(pipe, flip), cycling(pipe, creep), cycling(pipe, raised), cycling(pipe, flip[1:])
    (True, False, False, False)
    """
    if len(records) < CYCLE_RUN:
        return False
    run = records[-CYCLE_RUN:]
    if not all(abs(r.mask_growth) > pipe.mask_tol and r.change > tolerance(pipe, r) for r in run):
        return False
    # Each mask is made from the previous iteration's background, and a record's
    # floor is the one its successor is fitted at: the masks whose growth alternates,
    # and the masks they are compared with, come from backgrounds at one floor only if
    # the floor held over the CYCLE_RUN + 2 last records.
    floors = records[-CYCLE_RUN - 2 :]
    if len(floors) < CYCLE_RUN + 2 or not _one_floor(floors):
        return False
    return all(a.mask_growth * b.mask_growth < 0 for a, b in zip(run, run[1:], strict=False))


def stalled(pipe: Any, records: Sequence[Any]) -> bool:
    """Whether the last two of a stage's ``records`` had a settled mask and a background
    that moved by less than :data:`STALL_ERRORS` times its statistical error, the last
    change no smaller than :data:`STALL_RATIO` times the one before, at one smoothing
    floor. The change no longer shrinks, so more iterations cannot make it smaller,
    and it is already inside what the noise lets the fit determine: what moves is
    the flicker of pixels at the thresholds (with a flexible fit, a few thousand
    flipping pixels move it by about its statistical error). ``error_tol=0`` (no
    statistical error) switches it off.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    >>> rec = lambda c: R(change=c, error=0.02, mask_change=0.004, mask_growth=0.001)
    >>> stalled(pipe, [rec(0.013), rec(0.012)]), stalled(pipe, [rec(0.018), rec(0.012)])
    (True, False)
    """
    if len(records) < 2 or not pipe.error_tol:
        return False
    a, b = records[-2:]
    if not _one_floor((a, b)):
        return False
    for r in (a, b):
        inside = math.isfinite(r.error) and r.change <= STALL_ERRORS * r.error
        if not (inside and _mask_settled(pipe, r)):
            return False
    return b.change >= STALL_RATIO * a.change


def note_stalled(stage: int, iterations: int, run: Sequence[Any]) -> str:
    """The note of a fit whose last stage stalled (the records ``run``) inside its
    statistical error."""
    a, b = run[-2:]
    return (
        f"converged: stage {stage} stalled after {iterations} iteration(s) inside its "
        f"statistical error; the background moved by {a.change:.3g}, then "
        f"{b.change:.3g} of its RMS (statistical error {b.error:.3g}) with "
        f"{b.mask_change:.2%} of the pixels changing mask: pixels at the thresholds "
        "flicker, and more iterations would not move it less"
    )


def flickering(pipe: Any, records: Sequence[Any]) -> bool:
    """Whether the last :data:`FLICKER_RUN` of a stage's ``records``, at one smoothing
    floor, moved the background by little and no longer less and less, while the mask
    only flickered: each change within :data:`RUNAWAY_EXCESS` times its
    :func:`tolerance`, the last at least :data:`FLICKER_RATIO` of the first; the
    masked share moved by less than ``mask_tol`` over the run, and no iteration changed
    more than twice ``mask_tol`` of the pixels.

    That is :func:`stalled`'s state when the flicker of pixels at the thresholds moves
    the fit by more than its statistical error (many faint outskirts on the
    thresholds, a flexible fit): the stage has reached the floor that flicker sets,
    and more iterations would only repeat it. A mask that still grows or shrinks, or
    a change that still shrinks, is not a flicker floor.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    >>> rec = lambda c, f: R(change=c, error=0.006, mask_change=0.008, mask_fraction=f)
    >>> flickering(pipe, [rec(0.014, 0.456), rec(0.017, 0.457), rec(0.015, 0.458)])
    True
    >>> flickering(pipe, [rec(0.014, 0.446), rec(0.017, 0.452), rec(0.015, 0.458)])
    False
    >>> flickering(pipe, [rec(0.020, 0.456), rec(0.016, 0.457), rec(0.013, 0.458)])
    False
    """
    if len(records) < FLICKER_RUN:
        return False
    run = records[-FLICKER_RUN:]
    if not _one_floor(run):
        return False
    for r in run:
        if not (
            math.isfinite(r.change)
            and r.change <= RUNAWAY_EXCESS * tolerance(pipe, r)
            and r.mask_change <= 2.0 * pipe.mask_tol
        ):
            return False
    plateau = abs(run[-1].mask_fraction - run[0].mask_fraction) <= pipe.mask_tol
    return plateau and run[-1].change >= FLICKER_RATIO * run[0].change


def note_flicker(stage: int, iterations: int, run: Sequence[Any]) -> str:
    """The note of a fit whose last stage reached its flicker floor (:func:`flickering`;
    ``run``: the stage's records)."""
    last = run[-FLICKER_RUN:]
    changes = ", ".join(f"{r.change:.3g}" for r in last)
    spread = max(r.mask_fraction for r in last) - min(r.mask_fraction for r in last)
    return (
        f"converged: stage {stage} reached its flicker floor after {iterations} "
        f"iteration(s); the background moved by {changes} of its RMS, no longer "
        f"less and less, while the masked share stayed within {spread:.2%} and pixels "
        "at the thresholds flickered: more iterations would only repeat it"
    )


def creeping(pipe: Any, records: Sequence[Any]) -> bool:
    """Whether the last :data:`CREEP_RUN` of a stage's ``records`` each moved the
    background by less than its :func:`tolerance`, at one smoothing floor, while the
    mask still changed by more than ``mask_tol``. The masks creep into faint
    outskirts (a coarse scale's surround mean falls as more of its window is masked,
    and the masker finds a little more) without the background following: mask and
    background agree on the sky, and more iterations would move only the mask.

    Examples
    --------
    >>> from types import SimpleNamespace as R
    >>> pipe = R(change_tol=0.01, error_tol=0.5, mask_tol=0.005)
    >>> rec = lambda c: R(change=c, error=0.003, mask_change=0.012, mask_growth=0.01)
    >>> creeping(pipe, [rec(0.007), rec(0.003)]), creeping(pipe, [rec(0.018), rec(0.003)])
    (True, False)
    """
    if len(records) < CREEP_RUN:
        return False
    run = records[-CREEP_RUN:]
    if not _one_floor(run):
        return False
    return all(r.change <= tolerance(pipe, r) and not _mask_settled(pipe, r) for r in run)


def note_creeping(stage: int, iterations: int, run: Sequence[Any], pipe: Any) -> str:
    """The note of a fit whose last stage stopped on a creeping mask (``run``)."""
    changes = ", then ".join(f"{r.change:.3g}" for r in run[-CREEP_RUN:])
    growth = ", then ".join(f"{r.mask_growth:+.2%}" for r in run[-CREEP_RUN:])
    return (
        f"converged: stage {stage}'s background settled after {iterations} "
        f"iteration(s); it moved by {changes} of its RMS (tolerance "
        f"{tolerance(pipe, run[-1]):.3g}) while the masked share still moved by "
        f"{growth} of the image: the mask creeps into faint outskirts without "
        "moving the background"
    )


def wild_cycle(pipe: Any, rec: Any) -> bool:
    """Whether a cycle ending at ``rec`` jumped between backgrounds more than
    :data:`RUNAWAY_EXCESS` times the tolerance apart: the two masks then disagree
    about the sky itself, and their intersection is a way to stop, not a state in which
    mask and background agree (the result says it did not converge)."""
    return rec.change > RUNAWAY_EXCESS * tolerance(pipe, rec)


def note_cycle(stage: int, run: Sequence[Any], pipe: Any = None) -> str:
    """The note of a fit that stopped a limit cycle (the records ``run``) by keeping the
    intersection of the masks it alternated between; with ``pipe``, a cycle that
    :func:`wild_cycle` finds is said not to have converged."""
    shares = ", ".join(f"{r.mask_fraction:.1%}" for r in run)
    how = (
        f"in stage {stage} the masked share went {shares} by turns while the background "
        f"kept moving (by {run[-1].change:.3g} of its RMS), so the fit kept what the last "
        "two masks both held and refitted once"
    )
    if pipe is not None and wild_cycle(pipe, run[-1]):
        return (
            f"not converged: {how}; the background jumped by more than "
            f"{RUNAWAY_EXCESS:g} times its tolerance ({tolerance(pipe, run[-1]):.3g}) between "
            "the two masks, which disagree about the sky itself: do not trust this "
            "background (a larger max_source_size, or a mask of the structured sky, may help)"
        )
    return f"converged by resolving a cycle: {how}"


def note_converged(stage: int, iterations: int, rec: Any, pipe: Any) -> str:
    """The note of a fit whose last stage settled."""
    return (
        f"converged: stage {stage} settled after {iterations} iteration(s); the "
        f"background moved by {rec.change:.3g} of its RMS (tolerance "
        f"{tolerance(pipe, rec):.3g}) and {rec.mask_change:.2%} of the pixels changed mask"
    )


def note_mask_settled(stage: int, iterations: int, rec: Any, pipe: Any) -> str:
    """The note of a fit whose last stage stopped on a settled mask without a refit
    (``IterativeBackground.refit_settled`` False): the final refit used it."""
    return (
        f"converged: stage {stage} settled after {iterations} iteration(s); "
        f"{rec.mask_change:.2%} of the pixels changed mask (tolerance {pipe.mask_tol:.2%}), "
        "so the stage was not refitted and the final refit used that mask"
    )


def note_backed_off(stage: int, run: Sequence[Any], kept: Any) -> str:
    """The note of a fit that stopped a runaway (the records ``run``) and went back to
    the record ``kept``, the state before it."""
    grew = sum(r.mask_growth for r in run)
    return (
        f"converged by {BACKED_OFF} mask: in stage {stage} the masked share "
        f"grew by {grew:.1%} of the image over {len(run)} iterations while the background "
        f"kept moving (by {run[0].change:.3g}, then {run[-1].change:.3g} of its RMS), so "
        f"the fit went back to the state before (stage {kept.stage}, iteration "
        f"{kept.iteration}, mask {kept.mask_fraction:.1%})"
    )


def note_stopped(stage: int, cap: int, rec: Any, pipe: Any, iterations: int | None = None) -> str:
    """The note of a fit that hit its iteration cap without settling; ``iterations``:
    how many it made in all, when iterations that raised the smoothing floor did not
    count towards the cap."""
    why = []
    tol = tolerance(pipe, rec)
    if not rec.change <= tol:
        why.append(
            f"the background still moved by {rec.change:.3g} of its RMS (tolerance {tol:.3g})"
        )
    if not _mask_settled(pipe, rec):
        why.append(
            f"{rec.mask_change:.2%} of the pixels still changed mask and the masked share "
            f"moved by {rec.mask_growth:+.2%} (tolerance {pipe.mask_tol:.2%})"
        )
    extra = ""
    if iterations is not None and iterations > cap:
        extra = (
            f" ({iterations} in all; the {iterations - cap} that raised the smoothing "
            "floor do not count)"
        )
    return (
        f"not converged: stage {stage} stopped at its cap of {cap} iteration(s){extra}; "
        + " and ".join(why or ["the last iteration did not meet the tolerances"])
        + "; raise max_iter, or loosen change_tol / mask_tol"
    )
