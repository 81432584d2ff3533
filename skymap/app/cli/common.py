"""What the ``skymap`` subcommands share: exit codes, option groups, reading inputs,
fitting, and writing the products of a fit.

Every subcommand module of :mod:`skymap.app.cli` imports from here, never from another
subcommand (``batch`` maps :func:`skymap.app.cli.run.run_file`, the one exception).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import logging
import os
import re
import sys
import textwrap
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from skymap._validate import combine_masks
from skymap.app import io as skyio
from skymap.background.convergence import SETTLED_STOPS

log = logging.getLogger("skymap.cli")

#: Success.
EXIT_OK = 0
#: The work failed while running (a fit or a write failed; see the message).
EXIT_FAILURE = 1
#: Bad command line or bad input: unknown option, missing or unreadable file, bad config.
EXIT_USAGE = 2
#: An output exists and ``--overwrite`` was not given; nothing was written.
EXIT_EXISTS = 3
#: Interrupted (Ctrl-C).
EXIT_INTERRUPTED = 130

EXIT_CODES = """\
exit codes:
  0    success
  1    the work failed while running (the message says what failed)
  2    bad command line or bad input: a missing file, unreadable FITS, a bad config,
       or data the fit cannot use (e.g. every pixel masked)
  3    an output file exists, or another run is writing the same outputs; nothing was
       written (add --overwrite to replace existing files)
  130  interrupted; no partial output is left
"""

CONFIG_HELP = (
    "configuration (TOML): a file written by `skymap config`, or options of the default "
    "fit such as `high = 5.0` (default: the default fit)"
)

# skymap.quality.simulate.SCENE_NAMES, spelled out so that `skymap --help` need not import
# the simulator (numba, astropy.table); a test keeps the two equal.
SCENES = (
    "notebook",
    "crowded_stellar",
    "galaxies_lsb",
    "nebula",
    "detector_artifacts",
    "saturated_halos",
    "cluster_icl",
)


#: Smallest scene side (--size) worth fitting and reporting on.
MIN_SIZE = 32


class UsageError(Exception):
    """Bad command-line input (exit code 2)."""


def module(name: str, command: str):
    """Import ``skymap.<name>`` (e.g. ``quality.evaluate``), or fail with a message
    naming the command that needs it."""
    try:
        return importlib.import_module(f"skymap.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"skymap.{name}":
            raise
        raise RuntimeError(
            f"`skymap {command}` needs skymap.{name}, which this installation lacks"
        ) from None


# --------------------------------------------------------------------------- parser


def add_command(
    subparsers, name: str, *, help: str, description: str, examples: str
) -> argparse.ArgumentParser:
    """A subcommand's parser whose ``--help`` ends with its examples and the exit codes.

    ``examples`` is one example per line, ``command    what it does``.
    """
    epilog = "examples:\n" + textwrap.indent(textwrap.dedent(examples).strip("\n"), "  ")
    description = "\n\n".join(textwrap.fill(para, 88) for para in description.split("\n\n"))
    return subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"{epilog}\n\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def common_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("general options")
    g.add_argument(
        "--overwrite", action="store_true", help="replace existing output files (default: refuse)"
    )
    g.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars and no summary on stdout"
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log what is being done")


def _noise_spec(text: str):
    """``--error-hdu`` / ``--weight-hdu``: an HDU, or 'false' for none."""
    return False if text.strip().lower() in ("false", "none", "no") else text


def input_options(
    parser: argparse.ArgumentParser, *, mask: bool = True, noise: bool = False
) -> None:
    g = parser.add_argument_group("input selection")
    g.add_argument(
        "--hdu",
        metavar="HDU",
        help="HDU with the image: index, EXTNAME or EXTNAME,EXTVER such as SCI,2 (default: "
        "SCI if present, else the first 2D image)",
    )
    g.add_argument(
        "--dq-hdu",
        metavar="HDU",
        help="HDU with data-quality flags (default: a DQ extension when present)",
    )
    g.add_argument(
        "--dq-bits",
        metavar="BITS",
        help="flags that exclude a pixel, e.g. '1,4,16', '0x14' or 'bit2+bit4' "
        "(default: any nonzero DQ value)",
    )
    if noise:
        g.add_argument(
            "--error-hdu",
            metavar="HDU",
            type=_noise_spec,
            help="HDU with a 1-sigma error map; the maskers threshold in its units and the "
            "smoother weights by it (default: an ERR extension when present, else a WHT "
            "one; 'false' ignores both)",
        )
        g.add_argument(
            "--weight-hdu",
            metavar="HDU",
            type=_noise_spec,
            help="HDU with an inverse-variance weight map, e.g. drizzle's WHT (exclusive "
            "with --error-hdu)",
        )
    if mask:
        g.add_argument(
            "--mask",
            metavar="MASK.fits",
            help="extra mask image: nonzero pixels are excluded from the fit",
        )


def scene_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scene",
        default="notebook",
        choices=SCENES,
        help="built-in scene (default notebook: the STScI notebook's scene)",
    )
    p.add_argument("--seed", type=int, default=4, help="random seed (default 4)")
    p.add_argument(
        "--shrink-factor",
        type=int,
        default=2,
        help="notebook scene: image side is 2000 / SHRINK_FACTOR pixels (default 2)",
    )
    p.add_argument(
        "--size",
        type=int,
        metavar="N",
        help="other scenes: image side in pixels (default: the scene's own, 1024)",
    )


def tell(args, message: str) -> None:
    """Results the user asked for go to stdout; --quiet silences them."""
    if not args.quiet:
        sys.stdout.write(message + "\n")


# --------------------------------------------------------------------------- progress


def progress(*, total: int, desc: str, quiet: bool, unit: str = "step"):
    """A progress bar on stderr: tqdm's notebook widget only where ipywidgets is
    installed (tqdm.auto would otherwise warn "IProgress not found" in notebooks)."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm
    else:
        from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, unit=unit, file=sys.stderr, leave=False)


def iteration_report(bar, *, quiet: bool):
    """A ``callback`` for the pipeline's fit that shows each iteration on ``bar``, with
    the stage numbered as in the fit's history table and the report."""
    if quiet:
        return None

    def report(rec) -> None:
        bar.set_postfix_str(
            f"fitting: stage {rec.stage} iteration {rec.iteration}: change "
            f"{rec.change:.3g}, mask {rec.mask_fraction:.3f}"[:90]
        )

    return report


# --------------------------------------------------------------------------- inputs


def load_config(path: str | os.PathLike | None):
    """What a ``--config`` TOML file holds: a configuration object (a table with a
    ``type`` key, as ``skymap config`` writes), or else options of :func:`skymap.fit`
    (e.g. ``high = 5.0``), returned as a dict. None: the defaults."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {path} does not exist")
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    config_mod = module("app.config", "run --config")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        if "type" not in data:
            return fit_options(data, config_mod)
        return config_mod.from_dict(data)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
        raise UsageError(f"config file {path}: {err}") from err


def fit_options(data: Mapping, config_mod) -> dict:
    """Options of the default fit from a TOML table, each checked against the type
    :func:`skymap.background.defaults.default_pipeline` declares for it (the string
    "none" gives None where None is allowed); unknown keys are left for the fit to
    refuse with the list of accepted ones."""
    import typing

    pipeline = module("background.defaults", "run --config")
    hints = typing.get_type_hints(pipeline.default_pipeline)
    options = {}
    for key, value in data.items():
        hint = hints.get(key)
        if value == config_mod.NONE_TEXT and type(None) in typing.get_args(hint):
            value = None
        config_mod.check_type(value, hint, key)
        options[key] = value
    return options


def read_input(
    path, *, hdu=None, dq_hdu=None, dq_bits=None, mask=None, error_hdu=False, weight_hdu=False
) -> skyio.FitsImage:
    try:
        return skyio.read_image(
            path,
            hdu=hdu,
            dq=dq_hdu,
            dq_bits=dq_bits,
            mask=mask,
            error_hdu=error_hdu,
            weight_hdu=weight_hdu,
        )
    except (FileNotFoundError, ValueError, TypeError, OSError) as err:
        raise UsageError(str(err)) from err


def dq_bits(spec):
    if spec is None:
        return None
    try:
        return skyio.parse_dq_bits(spec)
    except ValueError as err:
        raise UsageError(str(err)) from err


def output_stem(path: str | os.PathLike, hdu: Any = None) -> str:
    """Output name stem: the file name without its FITS suffix, plus ``_sci2`` when a
    later chip (``--hdu SCI,2``) is chosen, so that chips of one file do not collide."""
    name = Path(path).name
    for suffix in (".fits.gz", ".fits.fz", ".fits", ".fit", ".fts"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = Path(name).stem
    key = skyio.parse_hdu(hdu) if hdu is not None else None
    if isinstance(key, tuple) and key[1] != 1:
        name = f"{name}_{key[0].lower()}{key[1]}"
    return name


def check_unique(stems, inputs) -> None:
    seen: dict[str, str] = {}
    for stem, p in zip(stems, inputs, strict=True):
        if stem in seen:
            raise UsageError(
                f"inputs {seen[stem]} and {p} share the name {stem!r}; their outputs would "
                "collide. Rename one or run them separately"
            )
        seen[stem] = str(p)


def scene_from_args(args):
    simulate = module("quality.simulate", args.command)
    if args.size is not None and args.size < MIN_SIZE:
        raise UsageError(f"--size must be at least {MIN_SIZE} pixels, got {args.size}")
    try:
        if args.scene == "notebook":
            return simulate.notebook_scene(seed=args.seed, shrink_factor=args.shrink_factor)
        shape = None if args.size is None else (args.size, args.size)
        return simulate.scene_by_name(args.scene, shape=shape, seed=args.seed)
    except ValueError as err:
        raise UsageError(str(err)) from err


# --------------------------------------------------------------------------- fitting


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class SingleFit:
    """A one-pass estimator's result (e.g. a MeshResult) in the shape of a pipeline's:
    its mask is the input's (flags and non-finite pixels), and there is no history."""

    background: np.ndarray
    rms: np.ndarray
    mask: np.ndarray
    mesh: Any
    config: Any
    history: tuple = ()


#: CPU seconds a first fit spends compiling the numba kernels of the default pipeline
#: (``python benchmarks/bench_cli.py --first-run``); later runs load them from the cache.
COMPILE_SECONDS = 8


def kernels_compiled() -> bool:
    """Whether the compiled kernels of the modules imported so far are in numba's
    cache (any of them: a cache holding some was filled by an earlier run)."""
    import pathlib

    dirs = {}
    for name, mod in list(sys.modules.items()):
        if not (name.startswith("skymap.") and name.endswith("kernels")):
            continue
        for obj in vars(mod).values():
            path = getattr(getattr(obj, "_cache", None), "_cache_path", None)
            if path:
                dirs[name.rpartition(".")[2]] = pathlib.Path(path)
                break
    if not dirs:
        return True  # nothing to tell
    return any(any(d.glob(f"{stem}.*.nbi")) for stem, d in dirs.items())


def announce_compiling(quiet: bool) -> None:
    """Say once, before the first fit of an installation, that it compiles kernels."""
    if quiet:
        return
    import pkgutil

    # the kernel modules of the default fit (importing one compiles nothing)
    for package in ("masking", "background", "backends"):
        pkg = module(package, "run")
        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name.endswith("kernels"):
                module(f"{package}.{info.name}", "run")
    if not kernels_compiled():
        sys.stderr.write(
            f"skymap: compiling kernels, once: ~{COMPILE_SECONDS} s (later runs load them "
            "from numba's cache)\n"
        )


def fit_image(
    image: np.ndarray, mask: np.ndarray | None, config: Any, callback=None, *, noise=None
):
    """Fit with ``config``: an estimator object with ``.fit`` (the pipeline, or a single
    :class:`skymap.background.mesh.MeshBackground` pass), a mapping of options, or None.

    skymap raises ValueError for data or settings it cannot use (no valid pixel, a box
    larger than the image, an unknown option): that is bad input, exit code 2.
    ``noise`` is ``{"error": map}`` or ``{"weight": map}`` (``--error-hdu`` /
    ``--weight-hdu``), or None.
    """
    noise = dict(noise or {})
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if config is not None and hasattr(config, "fit"):
                # a pipeline reports its iterations; a one-pass estimator has none
                params = inspect.signature(config.fit).parameters
                extra = {"callback": callback} if callback and "callback" in params else {}
                if noise and not set(noise) <= set(params):
                    raise UsageError(
                        f"this configuration's estimator ({type(config).__name__}) takes no "
                        "error or weight map: drop --error-hdu/--weight-hdu or pass "
                        "--error-hdu false"
                    )
                result = config.fit(image, mask=mask, **extra, **noise)
            else:
                pipeline = module("background.defaults", "run")
                options = dict(config) if isinstance(config, Mapping) else {}
                extra = {} if callback is None else {"callback": callback}
                result = pipeline.fit(image, mask=mask, **extra, **noise, **options)
    except ValueError as err:
        raise UsageError(f"cannot fit this image: {err}") from err
    # The library warns in Python's way (file, line, category); the command line says
    # it in one line. Non-convergence is told by warn_unconverged, with the reason.
    for w in caught:
        if "convergence" in w.category.__name__.lower():
            continue
        if issubclass(w.category, UserWarning):
            sys.stderr.write(f"skymap: warning: {w.message}\n")
        else:  # numerical and deprecation noise from the libraries
            log.debug("%s: %s", w.category.__name__, w.message)
    if getattr(result, "mask", None) is None:
        result = SingleFit(
            background=result.background,
            rms=result.rms,
            mask=combine_masks(np.asarray(image), mask),
            mesh=result,
            config=config,
        )
    return result


def result_config(result: Any, config: Any) -> Any:
    return getattr(result, "config", None) or config


def convergence(result: Any) -> dict:
    """Whether the fit converged, after how many iterations, and why it stopped.

    A single mesh pass has nothing to converge: ``converged`` is None. The reason is the
    result's ``convergence_note`` when it gives one; ``stop`` its one word
    (``BackgroundResult.stop``; None for a mesh pass).
    """
    history = getattr(result, "history", None) or ()
    converged = getattr(result, "converged", None)
    note = getattr(result, "convergence_note", None)
    if note is None and converged is False:
        note = "the iteration cap was reached before the background and mask settled"
    return {
        "converged": None if converged is None else bool(converged),
        "stop": getattr(result, "stop", "") or None,
        "iterations": len(history),
        "reason": note,
    }


def sky_scale(result: Any) -> dict:
    """The sky/source scale of a fit: ``max_source_size`` (px), the smoothing floor
    it ended with (px) and the largest source-tracking correlation seen, with whether
    that check raised the floor, and the wing pedestal the background was lowered by
    (image units). None values for fits without them (a mesh pass)."""
    history = getattr(result, "history", None) or ()
    size = getattr(result, "max_source_size", None)
    floors = [r.min_scale for r in history if getattr(r, "min_scale", None) is not None]
    seen = [r.tracking for r in history if np.isfinite(getattr(r, "tracking", np.nan))]
    strongest = max(seen, key=abs) if seen else None
    floor = floors[-1] if floors else None
    raised = bool(floors) and floor > floors[0] * 1.01
    pedestal = getattr(result, "pedestal", None)
    return {
        "max_source_size": None if size is None else float(size),
        "smoothing_floor": None if floor is None else float(floor),
        "source_tracking": None if strongest is None else float(strongest),
        "floor_raised_by_tracking": raised,
        "wing_pedestal": None if pedestal is None else float(pedestal),
    }


def warn_unconverged(result: Any, what: str, *, quiet: bool) -> None:
    """Say on stderr (a warning, also under --quiet) when the fit did not converge."""
    info = convergence(result)
    if info["converged"] is False:
        sys.stderr.write(
            f"skymap: warning: {what}: the fit did not converge after "
            f"{info['iterations']} iterations ({info['reason']}); the background may "
            "still be moving by more than its errors. See the report's convergence plot\n"
        )


def fit_summary(image: np.ndarray, result: Any) -> dict:
    """Headline numbers of a fit, JSON-ready."""
    bkg = np.asarray(result.background)
    mask = np.asarray(result.mask, dtype=bool)
    return {
        "shape": list(bkg.shape),
        "background_median": float(np.nanmedian(bkg)),
        "rms_median": float(np.nanmedian(np.asarray(result.rms))),
        "mask_fraction": float(mask.mean()),
        **convergence(result),
        **sky_scale(result),
        # the promise to users: a finite background wherever the input is finite
        "finite_background_where_input_finite": bool(
            np.all(np.isfinite(bkg)[np.isfinite(np.asarray(image))])
        ),
    }


_BITPIX = {8: "uint8", 16: "int16", 32: "int32", 64: "int64", -32: "float32", -64: "float64"}
_UNSIGNED = {16: ("uint16", 2**15), 32: ("uint32", 2**31), 64: ("uint64", 2**63)}


def file_dtype(img: skyio.FitsImage) -> str:
    """The pixel type stored in the file (BITPIX, scaling noted), not the type skymap
    works in (integers are read as float32)."""
    hdr = img.header
    bitpix = int(hdr.get("BITPIX", 0))
    bzero, bscale = hdr.get("BZERO", 0), hdr.get("BSCALE", 1)
    if bitpix in _UNSIGNED and bscale == 1 and bzero == _UNSIGNED[bitpix][1]:
        return _UNSIGNED[bitpix][0]
    name = _BITPIX.get(bitpix, str(img.data.dtype))
    if bitpix > 0 and (bscale != 1 or bzero != 0):
        name += f" (scaled: BSCALE={bscale}, BZERO={bzero})"
    return name


def image_unit(header) -> str:
    """The image's unit (BUNIT), or a note that the header gives none."""
    unit = str(header.get("BUNIT", "") if header is not None else "").strip()
    return unit or "not given (no BUNIT in the header)"


def tune_hint(stop: str | None) -> str | None:
    """The next step after a fit whose masks did not settle on their own (``stop``
    outside :data:`~skymap.background.convergence.SETTLED_STOPS`): a tune; None after
    any other stop."""
    if not stop or stop in SETTLED_STOPS:
        return None
    return (
        f"the masks did not settle on their own (stop: {stop}), as on frames filled by "
        "extended emission or by a galaxy, where the default options are least sure: "
        "`skymap tune IMAGE -o DIR` scores alternatives by injecting known sky and discs "
        "into this image, and leaves the defaults only for one that clearly beats them"
    )


def headline(result: Any, evaluation: Any) -> dict:
    """The few numbers a reader wants first, for the top of the report, each with a
    plain-language verdict."""
    ev = evaluation
    info = convergence(result)
    lines = {"mask fraction": f"{float(np.mean(result.mask)):.1%} of the pixels excluded"}
    if info["converged"] is None:
        lines["convergence"] = "one pass (nothing to iterate)"
    elif info["stop"] == "backed_off":
        # converged, but not by settling: say where the fit went back to
        lines["convergence"] = (
            f"converged by backing off a runaway mask, after {info['iterations']} "
            f"iterations: {info['reason']}"
        )
    elif info["converged"]:
        lines["convergence"] = f"converged after {info['iterations']} iterations"
    else:
        lines["convergence"] = (
            f"NOT CONVERGED after {info['iterations']} iterations: {info['reason']}"
        )
    hint = tune_hint(info["stop"])
    if hint:
        lines["next step"] = hint
    scale = sky_scale(result)
    if scale["max_source_size"] is not None:
        text = (
            f"objects up to {scale['max_source_size']:.0f} px are sources, broader "
            "structure is sky (max_source_size)"
        )
        if scale["floor_raised_by_tracking"]:
            text += (
                f"; the smoothing was then held at >= {scale['smoothing_floor']:.0f} px "
                "because the background moved with the masks (source-tracking "
                f"correlation {scale['source_tracking']:+.2f}: sky does not know where "
                "the sources are, so it was following source light or bending into holes)"
            )
        lines["sky/source scale"] = text
    noise = getattr(result, "noise", None)
    if scale["wing_pedestal"] and noise:
        lines["wing pedestal"] = (
            f"the background was lowered by {scale['wing_pedestal']:.4g} "
            f"({scale['wing_pedestal'] / noise:.2f} sigma): the level below the fit of the "
            "unmasked pixels beyond the reach of the sources' stacked wings, the light of "
            "wings and undetected sources that a fit through all unmasked pixels takes in "
            "(wing_pedestal=False skips it)"
        )
    if ev.truth_metrics is not None:
        err = ev.truth_metrics["rms_error_sigma"]
        lines["background error RMS"] = (
            f"{err:.4f} sigma (the fitted background against the true sky, in units of "
            "the pixel noise; 0 is perfect)"
        )
    lines[f"RMS-vs-scale ratio to {ev.reference} noise, large scales"] = ev.ratio_verdict
    if ev.masked_vs_unmasked is not None:
        t = ev.masked_vs_unmasked
        lines["background under mask - elsewhere"] = (
            f"{t.difference:.4g} +- {t.stderr:.2g} (z = {t.z:.2f} standard errors): "
            f"{ev.mask_verdict}"
        )
    return lines


# --------------------------------------------------------------------------- outputs


class OutputsBusyError(Exception):
    """Another run is writing the same outputs (exit code 3, like an existing output)."""


def planned_outputs(out_dir: Path, stem: str, *, report: bool) -> dict[str, Path]:
    """Every file a run on the input ``stem`` may write, all named after ``stem`` so that
    runs on different inputs never share a file."""
    paths = dict(skyio.product_paths(out_dir, stem))
    paths["metrics"] = out_dir / f"{stem}_metrics.json"
    if report:
        paths.update({f"report_{k}": p for k, p in report_paths(out_dir, stem).items()})
    return paths


def report_paths(out_dir: Path, stem: str) -> dict[str, Path]:
    """Every file the report of ``stem`` may have (``<stem>_report.html`` and PNGs)."""
    from skymap.app import report as report_mod

    return report_mod.report_paths(out_dir, tuple(report_mod.CAPTIONS), stem=f"{stem}_report")


def _check_names(out_dir: Path, paths: list[Path]) -> None:
    """Refuse names the filesystem cannot hold, before any work rather than after it."""
    try:
        name_max = os.pathconf(out_dir, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # pragma: no cover - non-POSIX
        name_max = 255
    for p in paths:
        if len(os.fsencode(p.name)) > name_max:
            raise UsageError(
                f"output name {p.name} is longer than the {name_max} bytes this filesystem "
                "allows; rename the input or choose another -o"
            )


def _stats(paths):
    out = {}
    for p in paths:
        with contextlib.suppress(OSError):
            st = p.stat()
            out[p] = (st.st_ino, st.st_mtime_ns, st.st_size)
    return out


@contextlib.contextmanager
def reserve_outputs(out_dir: Path, paths, *, overwrite: bool, owner: str):
    """Claim an output directory for one run, before any expensive work.

    Checks that ``out_dir`` is (or can be made) a writable directory whose filesystem
    takes every name in ``paths``, takes a lock file named after ``owner`` (a second run
    writing the same outputs concurrently gets exit code 3 before it writes anything),
    then checks that no output exists unless ``overwrite``. If the body fails or is
    interrupted, every file of ``paths`` this run created or replaced is removed, so no
    partial set of products is left under the final names.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    try:  # a name too long raises here, not a "does not exist"
        exists = out_dir.exists()
    except OSError as err:
        raise UsageError(f"cannot use output directory {out_dir}: {err.strerror}") from err
    if exists and not out_dir.is_dir():
        raise UsageError(
            f"output directory {out_dir} is an existing file, not a directory; choose another -o"
        )
    created = not exists
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create output directory {out_dir}: {err.strerror}") from err
    lock = out_dir / f".{owner}.skymap-lock"
    fd = None
    try:
        _check_names(out_dir, [*paths, lock])
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise OutputsBusyError(
                f"another skymap run is writing the outputs of {owner} into {out_dir}/ "
                f"(lock file {lock}); nothing was written. Wait for it, or delete the lock "
                "file if no run is active"
            ) from None
        except OSError as err:
            raise UsageError(
                f"cannot write into output directory {out_dir}: {err.strerror}"
            ) from err
        os.write(fd, f"{os.getpid()}\n".encode())
        skyio.check_outputs(paths, overwrite=overwrite)
        before = _stats(paths)
        try:
            yield
        except BaseException:
            for p, st in _stats(paths).items():
                if before.get(p) != st:
                    with contextlib.suppress(OSError):
                        p.unlink()
            raise
    finally:
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):
                lock.unlink()
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # only if this run left it empty


def write_outputs(
    out_dir: Path,
    stem: str,
    *,
    image: np.ndarray,
    result: Any,
    evaluation: Any,
    metrics: dict,
    header=None,
    config: Any = None,
    source=None,
    report: bool = True,
    title: str,
    meta: dict,
    overwrite: bool = False,
) -> dict[str, Path]:
    """The FITS products, ``<stem>_metrics.json`` and the report: what run and demo
    both write. With ``overwrite`` and no report, a report left by an earlier run on the
    same input is removed: it would describe other products."""
    written = skyio.write_products(
        out_dir,
        stem,
        image=image,
        background=result.background,
        rms=result.rms,
        mask=result.mask,
        header=header,
        config=config,
        source=source,
        overwrite=overwrite,
    )
    written["metrics"] = skyio.write_json(
        out_dir / f"{stem}_metrics.json", metrics, overwrite=overwrite
    )
    if report:
        from skymap.app import report as report_mod

        unit = str(header.get("BUNIT", "")).strip() if header is not None else ""
        figures = report_mod.report_figures(result, evaluation, unit=unit or None)
        pages = report_mod.write_report(
            out_dir,
            title=title,
            figures=figures,
            metrics=metrics,
            meta=meta,
            stem=f"{stem}_report",
            overwrite=overwrite,
        )
        written.update({f"report_{k}": v for k, v in pages.items()})
    elif overwrite:
        for p in report_paths(out_dir, stem).values():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return written


# The library's messages name keyword arguments; the command line names its options.
_CLI_WORDS = (
    (
        re.compile(r"pass overwrite=True \(on the command line: --overwrite\) to"),
        "add --overwrite to",
    ),
    (re.compile(r"pass overwrite=True to"), "add --overwrite to"),
    (re.compile(r"\b\w+= \((?:on the )?command line: (--[\w-]+)\)"), r"\1"),
    (re.compile(r"\bhdu="), "--hdu"),
    (re.compile(r"\bdq="), "--dq-hdu"),
    (re.compile(r"\bdq_bits\b"), "--dq-bits"),
    (re.compile(r"\berror_hdu\b"), "--error-hdu"),
    (re.compile(r"\bweight_hdu\b"), "--weight-hdu"),
)


def command_line_words(message: str) -> str:
    """``message`` with the API's keyword arguments replaced by the command's options.

    Examples
    --------
    >>> command_line_words("pass overwrite=True (on the command line: --overwrite) to replace it")
    'add --overwrite to replace it'
    >>> command_line_words("name the flag HDU with dq= (command line: --dq-hdu)")
    'name the flag HDU with --dq-hdu'
    """
    for pattern, replacement in _CLI_WORDS:
        message = pattern.sub(replacement, message)
    return message


def exit_code(err: BaseException) -> int:
    if isinstance(err, (skyio.OutputExistsError, OutputsBusyError)):
        return EXIT_EXISTS
    if isinstance(err, (UsageError, skyio.OutputPathError)):
        return EXIT_USAGE
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_FAILURE
