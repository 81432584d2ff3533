"""``skymap batch``: ``skymap run`` over many files on a Dask cluster."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from skymap.app import io as skyio
from skymap.app.cli import common
from skymap.app.cli.run import run_file

EXAMPLES = """
skymap batch *.fits -o out/            out/<name>/ per input, 2 local worker processes
skymap batch *.fits -o out/ --workers 4 --config sex.toml
skymap batch *.fits -o out/ --scheduler tcp://10.0.0.1:8786
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "batch",
        help="fit many FITS images in parallel (Dask)",
        description="Fit many FITS images on a Dask cluster: a local cluster of --workers "
        "processes, or the scheduler at --scheduler. Each input IN.fits gets the directory "
        "OUT/IN/ holding exactly what `skymap run IN.fits -o OUT/IN` writes. A failing "
        "file does not stop the others; the exit code is that of the worst failure.",
        examples=EXAMPLES,
    )
    p.add_argument("inputs", nargs="+", metavar="IN.fits", help="input FITS images")
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument(
        "-j", "--workers", type=int, default=2, help="local worker processes (default 2)"
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--threads",
        action="store_true",
        help="local workers are threads of this process, not separate processes (starts "
        "faster; the compiled kernels release the GIL, the rest of a fit does not)",
    )
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="address of a running dask scheduler, e.g. tcp://10.0.0.1:8786 (workers must "
        "see the same files)",
    )
    p.add_argument("--config", metavar="FILE.toml", help=common.CONFIG_HELP)
    p.add_argument("--no-report", action="store_true", help="skip the HTML reports")
    common.input_options(p)
    common.common_options(p)
    p.set_defaults(func=handle)


def _run_item(item: tuple, **kwargs) -> dict:
    """:func:`run_file` on one ``(input, output_dir)`` pair, as mapped by ``batch``."""
    path, out_dir = item
    return run_file(path, out_dir, **kwargs)


def handle(args) -> int:
    distributed = common.module("backends.distributed", "batch")
    stems = [common.output_stem(p, args.hdu) for p in args.inputs]
    common.check_unique(stems, args.inputs)
    for p in args.inputs:
        if not Path(p).is_file():
            raise common.UsageError(f"input image {p} does not exist")
    if args.workers < 1:
        raise common.UsageError(f"--workers must be >= 1, got {args.workers}")
    config = common.load_config(args.config)
    dq_bits = common.dq_bits(args.dq_bits)
    out_root = Path(args.output)
    report = not args.no_report
    # Each file gets its own directory: exactly what `skymap run FILE -o DIR/<stem>` writes.
    items = [(p, out_root / s) for p, s in zip(args.inputs, stems, strict=True)]
    planned = []
    for (_, d), s in zip(items, stems, strict=True):
        planned.extend(common.planned_outputs(d, s, report=report).values())
    skyio.check_outputs(planned, overwrite=args.overwrite)

    kwargs = {
        "config": config,
        "hdu": args.hdu,
        "dq_hdu": args.dq_hdu,
        "dq_bits": dq_bits,
        "mask": args.mask,
        "report": report,
        "overwrite": args.overwrite,
        "quiet": True,
    }
    with (
        common.progress(total=len(items), desc="batch", quiet=args.quiet, unit="file") as bar,
        (
            # workers as threads of this process: a LocalCluster without processes
            distributed.cluster_client(workers=args.workers, processes=False)
            if args.threads
            else contextlib.nullcontext()
        ) as client,
    ):
        rows = distributed.map_files(
            _run_item,
            items,
            client=client,
            workers=args.workers,
            scheduler=args.scheduler,
            progress=bar.update,
            **kwargs,
        )
    failures = [(item[0], err) for item, _, err in rows if err is not None]
    common.tell(args, f"processed {len(rows) - len(failures)}/{len(rows)} files into {out_root}/")
    for p, err in failures:
        sys.stderr.write(f"skymap: error: {p}: {common.command_line_words(str(err))}\n")
    return max((common.exit_code(err) for _, err in failures), default=common.EXIT_OK)
