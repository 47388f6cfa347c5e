"""Ultralytics YOLOv8 class probabilities as a detection reward (optional extra ``[yolo]``: AGPL-3.0).

The detection head outputs, per image, 8,400 candidate boxes with a sigmoid probability for each COCO class
(there is no objectness). The reward aggregates the target class's box probabilities like ``owlvit``: a soft
count or the maximum, ``mode="add"`` or ``"remove"``. ``yolo-count`` is the number of target detections that
YOLO's own postprocess keeps (ultralytics' non-maximum suppression at the predictor's settings): hard, so not
differentiable (for RL methods).

Ultralytics publishes its weights as pickled Python objects, which this library never unpickles. Convert a
trusted checkpoint once to a plain state dict and pass it with ``weights=`` (the error message says how).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from rewards import hints
from rewards.base import Reward, refuse_tracing
from rewards.detection import HARD_COUNT, DetectorReward, check_soft_aggregation
from rewards.registry import register_reward
from rewards.transforms import resize_longer_side_and_pad
from rewards.weights import MAIN, WeightsArg, load_state_dict_strict, read_state_dict

INPUT_SIZE = 640
LETTERBOX_FILL = 114 / 255
PREDICT_CONFIDENCE, PREDICT_IOU, PREDICT_MAX_DETECTIONS = 0.25, 0.7, 300
"""Ultralytics' ``predict`` defaults (``cfg/default.yaml``: ``conf``, ``iou``, ``max_det``), used by ``yolo-count``."""
VARIANTS = ("yolov8n", "yolov8s", "yolov8m", "yolov8l", "yolov8x")


def _ultralytics():
    try:
        import ultralytics
    except ImportError:
        raise ImportError(
            "the 'yolo' reward needs ultralytics (AGPL-3.0), an optional extra: pip install -e '.[yolo]'"
        ) from None
    return ultralytics


def coco_classes() -> list[str]:
    """The 80 COCO class names, from the dataset file ultralytics ships."""
    root = Path(_ultralytics().__file__).parent
    names = yaml.safe_load((root / "cfg" / "datasets" / "coco.yaml").read_text())["names"]
    return [names[i] for i in range(len(names))]


def resolve_targets(target: int | str | Sequence[int | str], names: list[str]) -> list[int]:
    items = [target] if isinstance(target, (int, str)) else list(target)
    indices = []
    for item in items:
        if isinstance(item, int) and 0 <= item < len(names):
            indices.append(item)
        elif isinstance(item, str) and item.lower() in names:
            indices.append(names.index(item.lower()))
        else:
            close = difflib.get_close_matches(str(item).lower(), names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(f"unknown COCO class {item!r}.{hint} Use an index 0-{len(names) - 1} or a class name.")
    if not indices:
        raise ValueError("target is empty; give at least one COCO class")
    return indices


def reinitialise(model: torch.nn.Module) -> None:
    """Random weights that keep activations alive through the network: He-normal convolutions and zero biases.

    With ultralytics' own initialisation (PyTorch's default convolution init, no BatchNorm statistics, a strong
    prior bias on the class logits) the activations of a random model vanish and every image gets the same score,
    which makes random-weight builds useless for tests and benchmarks."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.weight[0].numel()
            module.weight.data = torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5
            if module.bias is not None:
                module.bias.data.zero_()


def non_max_suppression():
    """Ultralytics' postprocess (``ultralytics.utils.nms`` since 8.3.1xx; ``ultralytics.utils.ops`` before)."""
    try:
        from ultralytics.utils.nms import non_max_suppression
    except ImportError:
        from ultralytics.utils.ops import non_max_suppression
    return non_max_suppression


class YOLOReward(DetectorReward):
    """Aggregated probabilities of the target COCO class(es) over YOLOv8's candidate boxes, or the hard count of
    the target detections after non-maximum suppression at IoU ``iou``."""

    name = "yolo"
    input_size = INPUT_SIZE

    def __init__(
        self,
        model: torch.nn.Module,
        classes: Sequence[int],
        mode: str = "add",
        aggregation: str = "soft_count",
        threshold: float | None = None,
        temperature: float | None = None,
        iou: float = PREDICT_IOU,
    ) -> None:
        super().__init__(mode, aggregation, threshold, temperature)
        if not 0.0 < iou <= 1.0:
            raise ValueError(f"iou is the overlap above which NMS drops a box, in (0, 1]; got {iou}")
        self.model = model
        self.iou = iou
        self.register_buffer("classes", torch.tensor(list(classes), dtype=torch.long), persistent=False)
        self.freeze()

    def predictions(self, images: torch.Tensor) -> torch.Tensor:
        """The head's output [B, 4 + 80, 8400] (box centre and size in letterboxed pixels, class probabilities)."""
        x = resize_longer_side_and_pad(images, INPUT_SIZE, LETTERBOX_FILL, "bilinear")
        output = self.model(x)
        return output[0] if isinstance(output, (list, tuple)) else output

    def box_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 8400] probability of the target class(es) per candidate box (max over a set of classes)."""
        return self.predictions(images)[:, 4 + self.classes, :].float().amax(dim=1)

    def hard_count(self, images: torch.Tensor) -> torch.Tensor:
        """[B] detections of the target class(es) that ultralytics' predictor keeps: boxes labelled with their best
        class, scored above the threshold, then class-wise non-maximum suppression at IoU ``iou``."""
        refuse_tracing(self.name, "runs ultralytics' non-maximum suppression, whose output size depends on the data")
        kept = non_max_suppression()(
            self.predictions(images).float(),
            conf_thres=self.threshold,
            iou_thres=self.iou,
            classes=self.classes.tolist(),
            max_det=PREDICT_MAX_DETECTIONS,
        )
        return torch.tensor([len(k) for k in kept], device=images.device)


@register_reward("yolo", components=(MAIN,), requires=("ultralytics",))
def yolo(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    target: int | str | Sequence[int | str] = "person",
    variant: str = "yolov8n",
    mode: str = "add",
    aggregation: str = "soft_count",
    threshold: float | None = None,
    temperature: float | None = None,
) -> Reward:
    """Ultralytics YOLOv8 COCO-class detection (optional extra, AGPL-3.0): soft count or max; add or remove."""
    check_soft_aggregation("yolo", aggregation)
    model = build_yolo("yolo", pretrained, weights, variant)
    return YOLOReward(model, resolve_targets(target, coco_classes()), mode, aggregation, threshold, temperature)


@register_reward("yolo-count", components=(MAIN,), requires=("ultralytics",), differentiable=False)
def yolo_count(
    pretrained: bool = True,
    weights: dict[str, WeightsArg] | None = None,
    target: int | str | Sequence[int | str] = "person",
    variant: str = "yolov8n",
    mode: str = "add",
    threshold: float = PREDICT_CONFIDENCE,
    iou: float = PREDICT_IOU,
) -> Reward:
    """YOLOv8 hard count (optional extra, AGPL-3.0): COCO-class detections after its own NMS (conf 0.25, IoU 0.7)."""
    model = build_yolo("yolo-count", pretrained, weights, variant)
    classes = resolve_targets(target, coco_classes())
    return YOLOReward(model, classes, mode, HARD_COUNT, threshold, iou=iou)


def build_yolo(name: str, pretrained: bool, weights: dict[str, WeightsArg] | None, variant: str) -> torch.nn.Module:
    """The detector of the reward ``name``: a converted state dict, or random weights (see :func:`reinitialise`)."""
    _ultralytics()
    from ultralytics.nn.tasks import DetectionModel

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    override = (weights or {}).get(MAIN)
    if pretrained and override is None:
        raise ValueError(
            f"Ultralytics publishes {variant}.pt as a pickled Python object, which this library does not unpickle. "
            f'Convert a trusted copy once: python -c "from ultralytics import YOLO; from safetensors.torch import '
            f"save_file; save_file(YOLO('{variant}.pt').model.float().state_dict(), '{variant}.safetensors')\", "
            f"then use {hints.usage(name, hints.weights(f'{variant}.safetensors'))}."
        )
    model = DetectionModel(f"{variant}.yaml", nc=80, verbose=False)
    if override is None:
        reinitialise(model)
    else:
        load_state_dict_strict(model, read_state_dict(Path(override)), f"checkpoint {override} for '{name}'")
    return model.eval()
