"""OWL-ViT detection reward against the transformers model's own outputs (independent preprocessing/tokens)."""

import pytest
import torch
from open_clip import get_tokenizer
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor

from rewards import MissingWeightsError, get_reward
from rewards.detection import DetectorReward
from rewards.owlvit import owlvit_config


def reference_outputs(model, images, query):
    """OwlViTProcessor's recipe by hand: 768x768 bicubic resize (aspect not kept), CLIP mean/std; the query
    tokenised with CLIP BPE, padded with id 0 to 16 tokens; the model's outputs (per-box logits and boxes)."""
    x = TF.resize(images, [768, 768], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    ids = get_tokenizer("ViT-B-32")([query])[:, :16]
    with torch.no_grad():
        return model(
            input_ids=ids.repeat(len(images), 1),
            attention_mask=(ids != 0).long().repeat(len(images), 1),
            pixel_values=x,
        )


def reference_logits(model, images, query):
    return reference_outputs(model, images, query).logits[..., 0]


def test_real_geometry_on_meta_device():
    with torch.device("meta"):
        model = OwlViTForObjectDetection(owlvit_config())
    assert sum(p.numel() for p in model.parameters()) == 153_231_879
    keys = set(model.state_dict())
    assert {
        "owlvit.logit_scale",
        "class_head.logit_shift.weight",
        "box_head.dense0.weight",
        "layer_norm.weight",
    } <= keys
    assert model.config.vision_config.image_size == 768 and model.config.vision_config.patch_size == 32


@pytest.mark.slow
def test_directory_loads_strictly_and_aggregates_the_model_outputs(tmp_path):
    torch.manual_seed(0)
    OwlViTForObjectDetection(OwlViTConfig()).save_pretrained(tmp_path / "owlvit-base-patch32")
    model = OwlViTForObjectDetection.from_pretrained(tmp_path / "owlvit-base-patch32").eval()
    images = torch.rand(2, 3, 512, 384)
    logits = reference_logits(model, images, "a strawberry")
    probabilities = torch.sigmoid(logits)
    assert logits.shape == (2, 576)
    for mode, sign in (("add", 1.0), ("remove", -1.0)):
        for aggregation, expected in (("soft_count", probabilities.sum(1)), ("max", probabilities.amax(1))):
            reward = get_reward("owlvit", pretrained=False, weights=tmp_path / "owlvit-base-patch32",
                                query="a strawberry", mode=mode, aggregation=aggregation)  # fmt: skip
            with torch.no_grad():
                torch.testing.assert_close(reward(images), sign * expected, rtol=1e-4, atol=1e-4)


def test_soft_threshold_and_gradient():
    torch.manual_seed(0)
    reward = get_reward("owlvit", pretrained=False, tiny=True, query="a bowl", threshold=0.5, temperature=0.1)
    images = torch.rand(2, 3, 96, 96, requires_grad=True)
    scores = reward(images)
    p = torch.sigmoid(reward.box_logits(images.detach()))
    torch.testing.assert_close(scores.detach(), torch.sigmoid((p - 0.5) / 0.1).sum(1), rtol=1e-5, atol=1e-5)
    scores.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.9])
def test_soft_count_tends_to_the_post_processed_count(tmp_path, threshold):
    """As the temperature goes to 0 the soft count converges to the number of boxes that transformers'
    post_process_object_detection keeps (score > threshold), on a model run through the reference recipe."""
    torch.manual_seed(0)
    OwlViTForObjectDetection(owlvit_config(tiny=True)).save_pretrained(tmp_path / "tiny")
    model = OwlViTForObjectDetection.from_pretrained(tmp_path / "tiny").eval()
    images = torch.rand(3, 3, 768, 768)
    kept = OwlViTImageProcessor().post_process_object_detection(
        reference_outputs(model, images, "a bowl"), threshold=threshold
    )
    hard = torch.tensor([float(len(k["scores"])) for k in kept])
    assert ((hard > 0) & (hard < 576)).all()  # a count, not all or nothing
    errors = []
    for relative in (1e-1, 1e-2, 1e-4, 1e-6):
        temperature = relative * min(threshold, 1 - threshold)
        reward = get_reward("owlvit", pretrained=False, weights=tmp_path / "tiny", query="a bowl",
                            threshold=threshold, temperature=temperature)  # fmt: skip
        with torch.no_grad():
            errors.append((reward(images) - hard).abs().max().item())
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.5, errors  # rounds to the hard count


@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_hard_count_is_the_post_processed_count(tmp_path, threshold):
    """``owlvit-count`` equals the number of boxes transformers' post_process_object_detection keeps, on a model run
    through the reference recipe, and carries no gradient."""
    torch.manual_seed(0)
    OwlViTForObjectDetection(owlvit_config(tiny=True)).save_pretrained(tmp_path / "tiny")
    model = OwlViTForObjectDetection.from_pretrained(tmp_path / "tiny").eval()
    images = torch.rand(3, 3, 768, 768)
    kept = OwlViTImageProcessor().post_process_object_detection(
        reference_outputs(model, images, "a bowl"), threshold=threshold
    )
    expected = torch.tensor([float(len(k["scores"])) for k in kept])
    assert ((expected > 0) & (expected < 576)).all() and len(set(expected.tolist())) > 1
    options = {} if threshold == 0.1 else {"threshold": threshold}  # 0.1: post_process_object_detection's default
    add = get_reward("owlvit-count", pretrained=False, weights=tmp_path / "tiny", query="a bowl", **options)
    remove = get_reward("owlvit-count", pretrained=False, weights=tmp_path / "tiny", query="a bowl", mode="remove",
                        **options)  # fmt: skip
    x = images.requires_grad_(True)
    scores = add(x)
    assert not add.differentiable and not scores.requires_grad
    assert torch.equal(scores, expected) and torch.equal(remove(x), -expected)


def test_the_hard_count_is_its_own_reward():
    with pytest.raises(ValueError, match=r"aggregation='count' is the hard count.*'owlvit-count'"):
        get_reward("owlvit", pretrained=False, tiny=True, query="x", aggregation="count")
    with pytest.raises(ValueError, match=r"'owlvit-count' got unknown option\(s\) temperature"):
        get_reward("owlvit-count", pretrained=False, tiny=True, query="x", temperature=0.01)
    with pytest.raises(ValueError, match="the hard count has none"):
        DetectorReward("add", "count", threshold=0.1, temperature=0.01)
    with pytest.raises(ValueError, match="counts the boxes above a threshold: give one"):
        DetectorReward("add", "count")
    assert not DetectorReward("remove", "count", threshold=0.1).differentiable
    with pytest.raises(ValueError, match="owlvit-count needs a text query"):
        get_reward("owlvit-count", pretrained=False, tiny=True)
    with pytest.raises(MissingWeightsError, match=r"'owlvit-count'.*google/owlvit-base-patch32"):
        get_reward("owlvit-count", query="a person")


def test_default_temperature_follows_the_threshold():
    for threshold in (0.05, 0.5, 0.98):
        reward = get_reward("owlvit", pretrained=False, tiny=True, query="x", threshold=threshold)
        assert reward.temperature == pytest.approx(0.1 * min(threshold, 1 - threshold))
    # A box scored 0 or 1 adds at most sigmoid(-10) of a false count (or misses that much of a true one).
    reward = get_reward("owlvit", pretrained=False, tiny=True, query="x", threshold=0.1)
    for p, count in ((0.0, 0.0), (1.0, 1.0)):
        gate = torch.sigmoid((torch.tensor(p) - reward.threshold) / reward.temperature).item()
        assert abs(gate - count) < 5e-5


def test_tiny_matches_reference(tmp_path):
    torch.manual_seed(0)
    OwlViTForObjectDetection(owlvit_config(tiny=True)).save_pretrained(tmp_path / "tiny")
    model = OwlViTForObjectDetection.from_pretrained(tmp_path / "tiny").eval()
    reward = get_reward("owlvit", pretrained=False, weights=tmp_path / "tiny", query="two red circles")
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            reward(images),
            torch.sigmoid(reference_logits(model, images, "two red circles")).sum(1),
            rtol=1e-4,
            atol=1e-4,
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [({}, "needs a text query"), ({"query": "x", "mode": "delete"}, "mode must be one of add, remove"),
     ({"query": "x", "aggregation": "sum"}, "aggregation must be one of soft_count, max, count"),
     ({"query": "x", "threshold": 1.0}, "strictly between 0 and 1"),
     ({"query": "x", "threshold": 0.1, "aggregation": "max"}, "threshold applies to aggregation='soft_count'"),
     ({"query": "x", "temperature": 0.1}, "give it with a threshold"),
     ({"query": "x", "threshold": 0.1, "temperature": 0.0}, "temperature must be positive")],
)  # fmt: skip
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        get_reward("owlvit", pretrained=False, tiny=True, **options)


def test_offline_error():
    with pytest.raises(MissingWeightsError, match="google/owlvit-base-patch32"):
        get_reward("owlvit", query="a person", mode="remove")
