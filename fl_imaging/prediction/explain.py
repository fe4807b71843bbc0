"""Saliency maps for ``fl-imaging-predict --explain``: where in an image the model looked.

Computed at the site, on the site's machine, beside each prediction; nothing is sent anywhere.

- Classification: Grad-CAM (Selvaraju et al. 2017) of the predicted class, MONAI's
  ``monai.visualize.GradCAM`` on the network's last feature maps (DenseNet: ``class_layers.relu``,
  ResNet: ``layer4``, as MONAI's documentation does; another network: its last convolution),
  upsampled by MONAI to the model's input and scaled to [0, 1] (1: the most important; MONAI's
  default scaling is the other way round).
- Segmentation: occlusion sensitivity, MONAI's ``monai.visualize.OcclusionSensitivity``, of the
  predicted structure: the score is the mean probability of the predicted class over the voxels
  predicted as foreground (all classes > 0, held fixed from the unoccluded prediction); each voxel
  gets the drop of that score when a cube of ``mask`` voxels around it is replaced by the image's
  mean intensity (MONAI averages the overlapping cubes). Computed within the structure's bounding
  box widened by one cube on every side (zero elsewhere); an image without a predicted
  structure gets an empty (zero) map, and a log line says so.

Ours: only the score of the predicted structure (MONAI's occlusion sensitivity explains a
classifier's output) and the overlay pictures. The map goes back to the input's own grid
through MONAI's ``Invertd``, as the masks do (:mod:`fl_imaging.prediction.predict`), and is written
as
``<case id>_gradcam.nii.gz`` / ``<case id>_occlusion.nii.gz`` (float32, the input's shape and
affine) and a PNG overlay: a 2D image whole, in its own pixel layout; a volume as the slice
through the map's maximum along its last voxel axis (first axis across, second axis up).
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from monai.visualize import GradCAM, OcclusionSensitivity
from torch import nn

from fl_imaging.config import ModelName, TaskConfig, TaskName
from fl_imaging.data.nifti_io import save_nifti
from tasks.base import ImagingTask
from tasks.segmentation import SegmentationTask

__all__ = ["Explainer", "StructureScore", "gradcam_layer", "occlusion_map", "overlay_png"]

log = logging.getLogger("fl_imaging.predict")

#: Grad-CAM's layer per MONAI network, as in MONAI's GradCAM documentation.
GRADCAM_LAYERS = {ModelName.densenet: "class_layers.relu", ModelName.resnet: "layer4"}
#: Suffixes of the 2D images PIL reads (MONAI's PILReader gives them as (width, height)).
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def gradcam_layer(model: nn.Module, cfg: TaskConfig) -> str:
    """The name of the layer whose feature maps Grad-CAM weighs: MONAI's documented choice for
    its DenseNet and ResNet, else ``model``'s last convolution. Raises ValueError without any."""
    name = GRADCAM_LAYERS.get(cfg.model.name, "")
    if name and name in dict(model.named_modules()):
        return name
    convolutions = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
    if not convolutions:
        raise ValueError("the model has no convolution for Grad-CAM")
    return convolutions[-1]


class StructureScore(nn.Module):
    """The score occlusion sensitivity follows for a segmentation: ``task``'s sliding-window
    ``model`` on images ``(B, C_in, *spatial)`` gives ``(B, 1)``, the mean over the voxels of
    ``mask`` ``(*spatial)`` (class indices; > 0 is the structure) of the probability of the
    class ``mask`` holds there."""

    def __init__(self, task: SegmentationTask, model: nn.Module, mask: torch.Tensor) -> None:
        super().__init__()
        self.task, self.model = task, model
        self.register_buffer("mask", mask.long())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *spatial)`` float32 -> ``(B, 1)`` scores in [0, 1]."""
        prob = torch.softmax(self.task.predict_logits(self.model, images), dim=1)
        index = self.mask.expand(images.shape[0], 1, *self.mask.shape)
        chosen = prob.gather(1, index)[:, 0]
        structure = (self.mask > 0).to(chosen.dtype)
        dims = tuple(range(1, chosen.ndim))
        return ((chosen * structure).sum(dim=dims) / structure.sum().clamp(min=1.0))[:, None]


def occlusion_map(
    task: SegmentationTask, model: nn.Module, image: torch.Tensor, mask: torch.Tensor, cube: int
) -> torch.Tensor:
    """Occlusion sensitivity of the predicted structure ``mask`` (``(*spatial)`` class indices)
    of ``image`` (``(C_in, *spatial)``), cubes of ``cube`` voxels (module docstring).

    Returns ``(*spatial)`` float32: the drop of the structure's score (in [-1, 1]; positive:
    hiding that part lowers the structure's probability), zero outside the structure's bounding
    box widened by ``cube``, all zero without a structure."""
    spatial = tuple(image.shape[1:])
    out = torch.zeros(spatial)
    inside = torch.nonzero(mask > 0)
    if inside.numel() == 0:
        return out
    score = StructureScore(task, model, mask).eval()
    sizes = [min(cube, s) for s in spatial]
    lows = [max(int(v) - c, 0) for v, c in zip(inside.min(0).values, sizes, strict=True)]
    highs = [
        min(int(v) + 1 + c, s) for v, c, s in zip(inside.max(0).values, sizes, spatial, strict=True)
    ]
    box = [b for lo, hi in zip(lows, highs, strict=True) for b in (lo, hi)]
    occlusion = OcclusionSensitivity(
        score,
        mask_size=sizes,
        n_batch=max(1, min(32, 2**24 // image.numel())),  # occluded copies per batch
        mode="mean_img",
        overlap=0.5,
        activate=False,
        verbose=False,
    )
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # MONAI's own indexing warnings
        base = float(score(image[None].float())[0, 0])
        occluded, _ = occlusion(image[None].float(), b_box=box)
    region = tuple(slice(lo, hi) for lo, hi in zip(lows, highs, strict=True))
    out[region] = base - torch.as_tensor(occluded)[0, 0].float()
    return out


def _to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map of ``(B, 1, *spatial)`` to [0, 1], its highest value to 1 (a constant
    map to 0)."""
    flat = maps.reshape(maps.shape[0], -1)
    low = flat.min(dim=1).values.reshape(-1, *[1] * (maps.ndim - 1))
    span = (flat.max(dim=1).values.reshape(low.shape) - low).clamp(min=1e-12)
    return (maps - low) / span


def _unit(values: np.ndarray, low_pct: float, high_pct: float) -> np.ndarray:
    low, high = np.percentile(values, [low_pct, high_pct])
    return np.clip((values - low) / (high - low), 0.0, 1.0) if high > low else values * 0.0


def overlay_png(image: np.ndarray, saliency: np.ndarray, path: Path, pil_layout: bool) -> Path:
    """Write a PNG of ``image`` (``(*spatial)``, grey) under ``saliency`` (same shape, its
    positive part in the "inferno" colours, more opaque where higher); for a volume, the slice
    through the saliency's maximum along the last axis. ``pil_layout``: the arrays are in the
    (width, height) order MONAI reads 2D images with, and the PNG gets the image's own layout
    and size; otherwise the second axis points up and the picture is enlarged (nearest
    neighbour, a whole factor) to at least 256 pixels across. Returns ``path``."""
    from matplotlib import colormaps
    from PIL import Image

    if image.ndim == 3:
        depth = int(np.unravel_index(np.argmax(saliency), saliency.shape)[2])
        image, saliency = image[..., depth], saliency[..., depth]
    grey = _unit(image.astype(np.float64), 1, 99)
    peak = float(saliency.max())
    heat = np.clip(saliency / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(grey)
    colours = colormaps["inferno"](heat)[..., :3]
    alpha = (0.6 * heat)[..., None]
    rgb = (1 - alpha) * grey[..., None] + alpha * colours
    rgb = np.transpose(rgb, (1, 0, 2))  # rows = second axis
    if not pil_layout:
        rgb = rgb[::-1]  # second axis up
    picture = Image.fromarray((rgb * 255).round().astype(np.uint8))
    if not pil_layout:  # a volume's slice: at least 256 pixels across
        scale = max(1, -(-256 // max(picture.size)))
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    picture.save(path)
    return path


class Explainer:
    """Saliency maps of one run's ``model`` (a copy: Grad-CAM's hooks stay on it) for ``task``
    and its ``cfg``; ``cube``: occlusion cube size in voxels (default: a quarter of the smallest
    ``roi_size``, at least 2)."""

    def __init__(
        self, task: ImagingTask, cfg: TaskConfig, model: nn.Module, cube: int | None = None
    ) -> None:
        self.task, self.cfg = task, cfg
        self.model = copy.deepcopy(model).eval()
        self.cube = cube or max(2, min(cfg.roi_size) // 4)
        self.cam: GradCAM | None = None
        if cfg.name == TaskName.classification:
            self.cam = GradCAM(
                nn_module=self.model,
                target_layers=gradcam_layer(self.model, cfg),
                postprocessing=_to_unit,  # MONAI's default maps the highest activation to 0
            )

    def saliency(self, image: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
        """The map of ``image`` (``(C_in, *spatial)``, after the inference transforms) given the
        model's ``prediction``: the class index (classification, 0-d) or the mask
        (segmentation, ``(*spatial)``). Returns ``(*spatial)`` float32."""
        if self.cam is not None:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # torch: no input needs gradients
                cam = self.cam(x=image[None].float(), class_idx=int(prediction))
            return torch.as_tensor(cam)[0, 0].detach().float()
        assert isinstance(self.task, SegmentationTask)
        return occlusion_map(self.task, self.model, image, prediction, self.cube)

    def write(
        self,
        sample: dict,
        transform: Compose,
        prediction: torch.Tensor,
        case_id: str,
        source: Path,
        output: Path,
    ) -> list[Path]:
        """Compute the map of ``sample`` (``image`` as ``transform`` made it), map it back to the
        input's grid with ``Invertd`` and write ``<case_id>_<method>.nii.gz`` and ``.png`` into
        ``output``; returns both paths. ``source`` is the input file (for its layout)."""
        method = "gradcam" if self.cam is not None else "occlusion"
        saliency = self.saliency(sample["image"], prediction)
        if self.cam is None and not bool((prediction > 0).any()):
            log.warning("%s: no structure predicted, its occlusion map is empty", case_id)
        sample = dict(sample)
        sample["saliency"] = MetaTensor(saliency[None])  # Invertd takes the image's history
        sample["background"] = MetaTensor(torch.as_tensor(sample["image"])[:1].clone())
        inverted = Invertd(
            keys=["saliency", "background"],
            transform=transform,
            orig_keys="image",
            nearest_interp=False,
        )(sample)
        back = inverted["saliency"]
        values = np.asarray(torch.as_tensor(back)[0], dtype=np.float32)
        picture = np.asarray(torch.as_tensor(inverted["background"])[0], dtype=np.float32)
        nifti = save_nifti(values, np.asarray(back.affine), output / f"{case_id}_{method}.nii.gz")
        pil = source.suffix.lower() in PIL_SUFFIXES
        png = overlay_png(picture, values, output / f"{case_id}_{method}.png", pil)
        return [nifti, png]
