"""``skymap simulate``: write a simulated scene with its truth."""

from __future__ import annotations

import io
from pathlib import Path

from skymap.app import io as skyio
from skymap.app.cli import common

EXAMPLES = """
skymap simulate                        the notebook's scene -> skymap_sim/notebook_image.fits ...
skymap simulate --scene crowded_stellar --size 512 --seed 1 -o sim/
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "simulate",
        help="write a simulated scene with its truth",
        description="Write a simulated scene as FITS: <scene>_image.fits, _sky.fits (the "
        "truth), _sources.fits, _noise.fits, _badpix.fits (when the scene has detector "
        "defects) and the source catalogue <scene>_catalog.ecsv.",
        examples=EXAMPLES,
    )
    p.add_argument("-o", "--output", default="skymap_sim", help="output directory (skymap_sim)")
    common.scene_options(p)
    common.common_options(p)
    p.set_defaults(func=handle)


def _write_table(path: Path, table, *, overwrite: bool) -> Path:
    buf = io.StringIO()
    table.write(buf, format="ascii.ecsv")
    payload = buf.getvalue().encode("utf-8")
    return skyio.atomic_write(path, lambda fh: fh.write(payload), overwrite=overwrite)


def handle(args) -> int:
    out_dir = Path(args.output)
    stem = args.scene
    names = ("image", "sky", "sources", "noise", "badpix")
    paths = {k: out_dir / f"{stem}_{k}.fits" for k in names}
    paths["catalog"] = out_dir / f"{stem}_catalog.ecsv"
    skyio.check_outputs(paths.values(), overwrite=args.overwrite)
    scene = common.scene_from_args(args)
    arrays = {
        "image": scene.image,
        "sky": scene.sky,
        "sources": scene.sources,
        "noise": scene.noise,
        "badpix": scene.mask,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    history = [f"skymap simulate: scene {scene.name}"]
    written = []
    for key, arr in arrays.items():
        if arr is not None:
            written.append(
                skyio.write_image(
                    paths[key], arr, product=key, history=history, overwrite=args.overwrite
                )
            )
    written.append(_write_table(paths["catalog"], scene.catalog, overwrite=args.overwrite))
    common.tell(args, f"{scene.name}: wrote {len(written)} files to {out_dir}/")
    for p in written:
        common.tell(args, f"  {p}")
    return common.EXIT_OK
