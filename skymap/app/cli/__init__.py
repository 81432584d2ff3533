"""The ``skymap`` command: fit, evaluate, simulate, match and batch-process FITS images.

Every subcommand is a thin layer over the Python API and lives in its own module of this
package (:mod:`~skymap.app.cli.run`, :mod:`~skymap.app.cli.demo`, ...), which exposes
``register(subparsers)`` and its handler; what they share is in
:mod:`~skymap.app.cli.common`. Adding a subcommand is one line in :data:`COMMANDS`.

Outputs are checked before any work starts, and an existing file is never replaced
without ``--overwrite``. :func:`main` takes an argument list and returns the exit code
(it never calls ``sys.exit``), so it can be driven from Python and tests; the console
script wraps it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import textwrap
from collections.abc import Sequence

from skymap import __version__
from skymap.app.cli.common import (
    EXIT_CODES,
    EXIT_EXISTS,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    UsageError,
    command_line_words,
    exit_code,
)

__all__ = [
    "COMMANDS",
    "EXIT_EXISTS",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_parser",
    "main",
    "run_file",
]

#: The subcommands, in the order ``skymap --help`` lists them: each names a module of
#: this package (or, dotted, any module) with ``register(subparsers)``.
COMMANDS = (
    "demo",
    "run",
    "batch",
    "simulate",
    "evaluate",
    "match",
    "config",
    "skymap.app.cli_quality",  # tune, compare
)

_EXAMPLES = """\
examples:
  skymap demo                          simulate a scene, fit it, score it -> skymap_out/
  skymap run image.fits -o out/        fit a FITS image -> out/image_background.fits ...
  skymap run image.fits --hdu SCI --dq-bits 1,4 --mask stars.fits
  skymap batch *.fits -o out/ --workers 4
  skymap config --kind sextractor -o sex.toml && skymap run image.fits --config sex.toml
  skymap <command> --help              options and examples of one command
"""


def __getattr__(name: str):
    # run_file is the per-file unit of `batch`; imported on use, like every command
    if name == "run_file":
        from skymap.app.cli.run import run_file

        return run_file
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _interrupted(err: BaseException | None) -> bool:
    """Whether ``err`` was raised from a KeyboardInterrupt (Python wraps one raised in
    some places, e.g. ``__set_name__`` during an import, in a RuntimeError)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, KeyboardInterrupt):
            return True
        err = err.__cause__ or err.__context__
    return False


def build_parser() -> argparse.ArgumentParser:
    """The ``skymap`` argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="skymap",
        description=textwrap.fill(
            "Model the 2D sky background of astronomical images, check how good the model "
            "is, and write the background, its rms, the source mask and the "
            "background-subtracted image as FITS, with a metrics JSON and an HTML report.",
            88,
        )
        + "\n\nNew here? Run `skymap demo` and open skymap_out/notebook_report.html.",
        epilog=f"{_EXAMPLES}\n{EXIT_CODES}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"skymap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMANDS:
        module = name if "." in name else f"{__name__}.{name}"
        importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``skymap`` command with ``argv`` (default ``sys.argv[1:]``).

    Returns
    -------
    int
        The exit code: 0 success, 1 runtime failure, 2 bad usage or input, 3 refusing to
        overwrite, 130 interrupted.

    Examples
    --------
    >>> main(["--version"])  # doctest: +SKIP
    skymap 0.1.0
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 0 for --help/--version, 2 for bad usage
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("skymap: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as err:  # the command line reports every failure as a message
        if _interrupted(err):  # Ctrl-C inside an import or a callback, wrapped
            sys.stderr.write("skymap: interrupted\n")
            return EXIT_INTERRUPTED
        code = exit_code(err)
        sys.stderr.write(f"skymap: error: {command_line_words(str(err))}\n")
        if code == EXIT_FAILURE:
            if args.verbose:
                import traceback

                traceback.print_exc(file=sys.stderr)
            else:
                sys.stderr.write("skymap: run again with --verbose for the traceback\n")
        return code


if __name__ == "__main__":
    sys.exit(main())
