"""``skymap config``: write a configuration file to edit and pass to ``--config``."""

from __future__ import annotations

import sys
from pathlib import Path

from skymap.app import io as skyio
from skymap.app.cli import common

EXAMPLES = """
skymap config -o fit.toml              the default pipeline, every key commented
skymap config --kind sextractor -o sex.toml && skymap run image.fits --config sex.toml
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "config",
        help="write a configuration file to edit and pass to --config",
        description="Write a configuration as TOML (to stdout, or to -o FILE), with a "
        "comment on every key: the default pipeline, or a single mesh pass "
        "(--kind mesh, or presets that reproduce SExtractor or photutils "
        "Background2D). Edit it and pass it to `skymap run --config`.",
        examples=EXAMPLES,
    )
    p.add_argument(
        "input",
        nargs="?",
        metavar="IN.fits",
        help="optional: the default pipeline is the same for every image (0.1 scripts "
        "passed one; it is only checked that it can be read)",
    )
    p.add_argument(
        "--kind",
        default="pipeline",
        choices=("pipeline", "mesh", "sextractor", "photutils"),
        help="what to configure (default pipeline)",
    )
    p.add_argument("--box-size", type=int, metavar="N", help="mesh kinds: box size (64)")
    p.add_argument("--hdu", metavar="HDU", help="HDU of IN.fits with the image")
    p.add_argument("-o", "--output", metavar="FILE.toml", help="output file (default stdout)")
    common.common_options(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    config_mod = common.module("app.config", "config")
    if args.kind == "pipeline":
        if args.input is not None:
            common.read_input(args.input, hdu=args.hdu)  # a bad file is still an error
        # the default pipeline needs no image (its cells follow the image at fit time)
        obj = common.module("background.defaults", "config").default_pipeline()
    else:
        from skymap.background.mesh import MeshBackground

        box = args.box_size
        try:
            if args.kind == "sextractor":
                obj = MeshBackground.like_sextractor(box_size=box or 64)
            elif args.kind == "photutils":
                obj = MeshBackground.like_photutils(box or 64)
            else:
                obj = MeshBackground() if box is None else MeshBackground(box_size=box)
        except ValueError as err:
            raise common.UsageError(str(err)) from err
    if args.output is None:
        sys.stdout.write(config_mod.dumps_toml(obj))
        return common.EXIT_OK
    path = Path(args.output)
    skyio.check_outputs([path], overwrite=args.overwrite)
    config_mod.save_toml(obj, path, overwrite=args.overwrite)
    common.tell(args, f"wrote {path}; use it with `skymap run IN.fits --config {path}`")
    return common.EXIT_OK
