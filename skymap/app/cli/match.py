"""``skymap match``: match sky levels across overlapping images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from skymap import __version__
from skymap.app import io as skyio
from skymap.app.cli import common

EXAMPLES = """
skymap match a.fits b.fits c.fits -o matched/        sky levels -> matched/skymatch.json
skymap match *.fits --subtract --statistic median    also write <name>_skymatched.fits
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "match",
        help="match sky levels across overlapping images",
        description="Measure the sky level of each image so that overlapping images agree "
        "(WCS overlaps), and write skymatch.json; with --subtract, also "
        "<name>_skymatched.fits.",
        examples=EXAMPLES,
    )
    p.add_argument("inputs", nargs="+", metavar="IN.fits", help="overlapping FITS images")
    p.add_argument("-o", "--output", default="skymap_match", help="output directory")
    p.add_argument(
        "--method",
        default="global+match",
        choices=("local", "global", "match", "global+match"),
        help="how sky levels are found (default global+match)",
    )
    p.add_argument(
        "--statistic",
        default="mode",
        choices=("mode", "median", "mean"),
        help="sky statistic of the clipped pixels (default mode)",
    )
    p.add_argument(
        "--match-up",
        action="store_true",
        help="bring fainter skies up to the brightest (default: brighter skies down)",
    )
    p.add_argument("--subtract", action="store_true", help="write the sky-subtracted images too")
    common.input_options(p, mask=False)
    common.common_options(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    from astropy.nddata import NDData

    if len(args.inputs) < 2:
        raise common.UsageError("skymap match needs at least two images")
    out_dir = Path(args.output)
    stems = [common.output_stem(p, args.hdu) for p in args.inputs]
    common.check_unique(stems, args.inputs)
    paths = {"json": out_dir / "skymatch.json"}
    if args.subtract:
        paths.update({s: out_dir / f"{s}_skymatched.fits" for s in stems})
    skyio.check_outputs(paths.values(), overwrite=args.overwrite)
    bits = common.dq_bits(args.dq_bits)
    images = [common.read_input(p, hdu=args.hdu, dq_bits=bits) for p in args.inputs]
    skymatch = common.module("mosaic.skymatch", "match")
    ndds = [NDData(im.data, mask=im.mask, wcs=im.wcs) for im in images]
    try:
        result = skymatch.match(
            ndds,
            method=args.method,
            statistic=args.statistic,
            match_down=not args.match_up,
            subtract=args.subtract,
        )
    except ValueError as err:
        raise common.UsageError(str(err)) from err
    sky = np.asarray(result.sky, dtype=float)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in args.inputs]
    summary = {
        "method": args.method,
        "statistic": args.statistic,
        "skymap_version": __version__,
        "images": [{"file": f, "sky": float(level)} for f, level in zip(files, sky, strict=True)],
        "groups": [[int(i) for i in g] for g in result.groups],
        "overlaps": [
            {
                "a": files[int(a)],
                "b": files[int(b)],
                "delta": float(d),
                "error": float(e),
                "npix": int(n),
                "residual": float(r),
            }
            for (a, b), d, e, n, r in zip(
                np.asarray(result.pairs).reshape(-1, 2),
                result.pair_delta,
                result.pair_error,
                result.pair_npix,
                result.pair_residual,
                strict=True,
            )
        ],
        "reduced_chi2": float(result.reduced_chi2),
    }
    if args.subtract:
        # skymatch's own copies: an image whose sky could not be measured (NaN) is left
        # as it is rather than turned into NaN
        for s, im, level, sub in zip(stems, images, sky, result.images, strict=True):
            skyio.write_image(
                paths[s],
                sub.data,
                header=im.header,
                product="skymatched",
                config=result.config,
                source=im.path,
                history=[f"skymap match: subtracted sky level {level:.6g}"],
                overwrite=args.overwrite,
            )
    skyio.write_json(paths["json"], summary, overwrite=args.overwrite)
    for entry in summary["images"]:
        common.tell(args, f"{entry['sky']:14.6g}  {entry['file']}")
    common.tell(args, f"wrote {paths['json']}")
    return common.EXIT_OK
