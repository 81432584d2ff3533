"""``skymap demo``: simulate a scene, fit it, score it against the truth."""

from __future__ import annotations

import time
from pathlib import Path

from skymap import __version__
from skymap.app import io as skyio
from skymap.app.cli import common

EXAMPLES = """
skymap demo                            the notebook's scene -> skymap_out/notebook_report.html
skymap demo --scene nebula --size 256 -o neb/
skymap demo --config my.toml --overwrite
"""


def register(subparsers) -> None:
    p = common.add_command(
        subparsers,
        "demo",
        help="simulate a scene, fit it, score it against the truth, write everything",
        description="Simulate a scene with known sky (by default the STScI 'Complex 2D "
        "Background' notebook's scene), fit its background with the default pipeline, "
        "score the fit against the true sky, and write the image, the true sky, the FITS "
        "products, <scene>_metrics.json and <scene>_report.html.",
        examples=EXAMPLES,
    )
    p.add_argument("-o", "--output", default="skymap_out", help="output directory (skymap_out)")
    common.scene_options(p)
    p.add_argument("--config", metavar="FILE.toml", help=common.CONFIG_HELP)
    common.common_options(p)
    p.set_defaults(func=handle)


def handle(args) -> int:
    out_dir = Path(args.output)
    config = common.load_config(args.config)
    stem = args.scene
    inputs = {"image": out_dir / f"{stem}_image.fits", "sky": out_dir / f"{stem}_sky.fits"}
    planned = [*common.planned_outputs(out_dir, stem, report=True).values(), *inputs.values()]
    with (
        common.reserve_outputs(out_dir, planned, overwrite=args.overwrite, owner=stem),
        common.progress(total=4, desc="demo", quiet=args.quiet) as bar,
    ):
        bar.set_postfix_str("simulating")
        scene = common.scene_from_args(args)
        bar.update()
        common.announce_compiling(quiet=args.quiet)
        bar.set_postfix_str("fitting")
        t0 = time.perf_counter()
        report_to = common.iteration_report(bar, quiet=args.quiet)
        result = common.fit_image(scene.image, scene.mask, config, report_to)
        fit_seconds = time.perf_counter() - t0
        common.warn_unconverged(result, f"scene {scene.name}", quiet=args.quiet)
        bar.update()
        bar.set_postfix_str("evaluating")
        evaluation = common.module("quality.evaluate", "demo").evaluate(
            scene.image, result, scene=scene
        )
        cfg = common.result_config(result, config)
        metrics = {
            "scene": {"name": scene.name, "shape": list(scene.shape), "seed": args.seed},
            "skymap_version": __version__,
            "config_hash": skyio.config_hash(cfg),
            "fit": common.fit_summary(scene.image, result),
            "evaluation": evaluation.to_dict(),
        }
        bar.update()
        bar.set_postfix_str("writing")
        history = [f"skymap demo: simulated scene {scene.name}"]
        written = {
            k: skyio.write_image(p, arr, product=k, history=history, overwrite=args.overwrite)
            for (k, p), arr in zip(inputs.items(), (scene.image, scene.sky), strict=True)
        }
        written.update(
            common.write_outputs(
                out_dir,
                stem,
                image=scene.image,
                result=result,
                evaluation=evaluation,
                metrics=metrics,
                config=cfg,
                source=inputs["image"],
                title=f"skymap demo: {scene.name}",
                meta={
                    "scene": scene.name,
                    "skymap version": __version__,
                    "configuration hash": skyio.config_hash(cfg),
                    "fit time (s)": round(fit_seconds, 2),
                    **common.headline(result, evaluation),
                },
                overwrite=args.overwrite,
            )
        )
        bar.update()
    truth = evaluation.truth_metrics
    common.tell(
        args,
        f"{scene.name}: background error RMS = {truth['rms_error_sigma']:.4f} sigma, "
        f"mask fraction {metrics['fit']['mask_fraction']:.1%}, fit {fit_seconds:.1f} s",
    )
    common.tell(args, f"wrote {len(written)} files to {out_dir}/; open {written['report_html']}")
    return common.EXIT_OK
