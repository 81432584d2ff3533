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
        "(WCS overlaps; files without a celestial WCS must share one pixel grid), and "
        "write skymatch.json; with --subtract, also <name>_skymatched.fits.",
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
    p.add_argument(
        "--model",
        default="offset",
        choices=("offset", "plane", "poly2"),
        help="sky of each image: a constant (default), a plane or a quadratic in its "
        "pixels (plane/poly2 need --method match or global+match)",
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
    ndds = [
        NDData(im.data, mask=im.mask, wcs=w)
        for im, w in zip(images, _match_wcs(args, images), strict=True)
    ]
    try:
        result = skymatch.match(
            ndds,
            method=args.method,
            statistic=args.statistic,
            match_down=not args.match_up,
            subtract=args.subtract,
            model=args.model,
        )
    except ValueError as err:
        raise common.UsageError(str(err)) from err
    sky = np.asarray(result.sky, dtype=float)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in args.inputs]
    summary = {
        "method": args.method,
        "statistic": args.statistic,
        "model": args.model,
        "skymap_version": __version__,
        "images": [
            {"file": f, "sky": float(level), "coefficients": [float(c) for c in coef]}
            for f, level, coef in zip(files, sky, result.coefficients, strict=True)
        ],
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
                history=[f"skymap match: subtracted {args.model} sky, {level:.6g} at centre"],
                overwrite=args.overwrite,
            )
    skyio.write_json(paths["json"], summary, overwrite=args.overwrite)
    for entry in summary["images"]:
        common.tell(args, f"{entry['sky']:14.6g}  {entry['file']}")
    common.tell(args, f"wrote {paths['json']}")
    return common.EXIT_OK


def _match_wcs(args, images) -> list:
    """Each input's celestial WCS; None for all when no input has one (they must then
    share one pixel grid). A mix is refused: overlaps cannot be placed."""
    wcs = [im.wcs for im in images]
    celestial = [w.has_celestial for w in wcs]
    if all(celestial):
        return wcs
    if any(celestial):
        missing = [str(p) for p, c in zip(args.inputs, celestial, strict=True) if not c]
        raise common.UsageError(
            f"inputs without a celestial WCS: {', '.join(missing)}; the others have one. "
            "Either every input needs a celestial WCS, or none (then all share one pixel "
            "grid)"
        )
    common.tell(args, "no input has a celestial WCS: treating them as one pixel grid")
    return [None] * len(images)
