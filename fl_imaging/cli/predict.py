"""The ``fl-imaging-predict`` command: apply a trained global model to a site's images.

    fl-imaging-predict RUN_DIR INPUT [--output DIR] [--explain] [--device DEVICE]

RUN_DIR is the folder of a finished ``fl-imaging`` run (config.yaml, model.pt). INPUT is a site
folder, a folder of images (NIfTI, 2D images, DICOM series folders) or one image; for a run on
multi-modal cases (data.modalities), a folder with one sub-folder per modality
(MODALITY/CASE_ID.nii.gz), or a site folder whose images/ has them. Segmentation
masks are written as NIfTI in each input's geometry; classification as predictions.csv.
--explain adds a saliency map beside each prediction, in the input's geometry (NIfTI and a PNG
overlay): Grad-CAM of the predicted class, or the occlusion sensitivity of the predicted
structure; it is computed here and stays here. --device (auto, cpu, cuda, cuda:N) overrides
the run's task.device; the run's task.amp applies on a GPU.
Exits 0 on success, 1 when an input cannot be read or the run folder is incomplete.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fl_imaging.data.sites import SiteDataError
from fl_imaging.prediction.predict import PredictionError, load_run, predict_folder

__all__ = ["entry", "main"]


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, predict, print where the results are; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="fl-imaging-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", type=Path, help="folder of a finished run (config.yaml, model.pt)"
    )
    parser.add_argument("input", type=Path, help="site folder, folder of images, or one image")
    parser.add_argument(
        "--output", type=Path, default=None, help="default: RUN_DIR/predictions/<input name>"
    )
    parser.add_argument(
        "--explain",
        action="store_true",
        help="also write a saliency map per image: CASE_gradcam / CASE_occlusion .nii.gz + .png",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="auto | cpu | cuda | cuda:N (default: the run's task.device)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    output = args.output or args.run_dir / "predictions" / args.input.resolve().name
    try:
        run = load_run(args.run_dir)
        written = predict_folder(run, args.input, output, explain=args.explain, device=args.device)
    except (PredictionError, SiteDataError) as err:
        print(f"fl-imaging-predict: error: {err}", file=sys.stderr)
        return 1
    print(f"{len(written)} file(s) written to {output}")
    return 0


def entry() -> None:
    """Console-script wrapper: exit with :func:`main`'s code."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
