"""YOLOv8 reward (optional extra): state-dict loading, agreement with the model's own head, refusals."""

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("ultralytics")

from ultralytics.nn.tasks import DetectionModel

from rewards import WeightsMismatchError, get_reward
from rewards.yolo import coco_classes, reinitialise, resolve_targets

pytestmark = pytest.mark.extra


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    reinitialise(model)
    path = tmp_path_factory.mktemp("yolo") / "yolov8n.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model, path


def test_state_dict_loads_strictly_and_aggregates_the_head(checkpoint):
    model, path = checkpoint
    assert len(model.state_dict()) == 355
    images = torch.rand(2, 3, 640, 640)  # square 640: the letterbox is the identity
    with torch.no_grad():
        probabilities = model(images)[0][:, 4 + 16, :]  # class 16: dog
        for mode, sign in (("add", 1), ("remove", -1)):
            reward = get_reward("yolo", pretrained=False, weights=path, target="dog", mode=mode)
            torch.testing.assert_close(reward(images), sign * probabilities.sum(dim=1), rtol=1e-4, atol=1e-3)
        best = get_reward("yolo", pretrained=False, weights=path, target=16, aggregation="max")
        torch.testing.assert_close(best(images), probabilities.amax(dim=1), rtol=1e-5, atol=1e-6)


def test_letterbox_keeps_aspect_and_pads_grey():
    reward = get_reward("yolo", pretrained=False)
    seen = {}
    reward.model.register_forward_pre_hook(lambda module, args: seen.setdefault("x", args[0]))
    reward(torch.ones(1, 3, 320, 160))
    x = seen["x"]
    assert x.shape == (1, 3, 640, 640)
    assert torch.allclose(x[..., :, :100], torch.full_like(x[..., :, :100], 114 / 255))
    assert torch.allclose(x[..., :, 200:440], torch.ones_like(x[..., :, 200:440]))


def test_targets_and_refusals(tmp_path):
    names = coco_classes()
    assert len(names) == 80 and names[0] == "person"
    assert resolve_targets(["person", "Dog", 2], names) == [0, 16, 2]
    with pytest.raises(ValueError, match=r"unknown COCO class 'persn'.*Did you mean 'person'"):
        resolve_targets("persn", names)
    with pytest.raises(ValueError, match=r"pickled Python object.*save_file.*weights='yolov8n\.safetensors'"):
        get_reward("yolo")
    state = DetectionModel("yolov8n.yaml", nc=80, verbose=False).state_dict()
    state.pop("model.22.dfl.conv.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsMismatchError, match=r"missing: model\.22\.dfl\.conv\.weight"):
        get_reward("yolo", pretrained=False, weights=tmp_path / "bad.safetensors")


def test_hard_count_is_the_postprocessed_count(checkpoint):
    """``yolo-count`` equals the detections ultralytics' own non_max_suppression keeps at the predictor's settings,
    and, with suppression off (iou=1), the boxes whose best class is the target and scores above the threshold,
    counted by hand from the head."""
    from ultralytics.utils.nms import non_max_suppression

    model, path = checkpoint
    images = torch.rand(3, 3, 640, 640)  # square 640: the letterbox is the identity
    with torch.no_grad():
        predictions = model(images)[0]
    probabilities = predictions[:, 4:]
    best, labels = probabilities.max(dim=1)
    target = labels.flatten().mode().values.item()  # random weights: the class most boxes pick
    threshold = best[labels == target].median().item()  # random weights score every box near 0.5
    kept = non_max_suppression(predictions, threshold, 0.7, classes=[target], max_det=300)
    expected = torch.tensor([float(len(k)) for k in kept])
    by_hand = ((labels == target) & (best > threshold)).sum(dim=1).float()
    assert (expected > 0).all() and (by_hand > expected).all(), "NMS merges overlapping boxes"
    x = images.requires_grad_(True)
    reward = get_reward("yolo-count", pretrained=False, weights=path, target=target, threshold=threshold)
    scores = reward(x)
    assert not reward.differentiable and not scores.requires_grad
    assert torch.equal(scores, expected)
    unsuppressed = get_reward("yolo-count", pretrained=False, weights=path, target=target, threshold=threshold,
                              iou=1.0, mode="remove")  # fmt: skip
    assert torch.equal(unsuppressed(x), -torch.minimum(by_hand, torch.tensor(300.0)))
    with pytest.raises(ValueError, match=r"aggregation='count' is the hard count.*'yolo-count'"):
        get_reward("yolo", pretrained=False, aggregation="count")
    with pytest.raises(ValueError, match=r"iou is the overlap above which NMS drops a box"):
        get_reward("yolo-count", pretrained=False, iou=0.0)
    assert get_reward("yolo-count", pretrained=False).threshold == 0.25  # ultralytics' predict default
