"""ResNet-50 target-class reward: reference layouts, independent computation, target parsing."""

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import ResNet50_Weights, resnet50

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.resnet import resolve_classes

CATEGORIES = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random torchvision ResNet-50 saved as torchvision saves it (a plain state dict, .pth)."""
    model = resnet50(weights=None).eval()
    path = tmp_path_factory.mktemp("resnet") / "resnet50-11ad3fa6.pth"
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize(("recipe", "weights_enum"), [("v1", ResNet50_Weights.IMAGENET1K_V1), ("v2", None)])
def test_matches_log_softmax_computed_independently(checkpoint, recipe, weights_enum):
    model, path = checkpoint
    weights_enum = weights_enum or ResNet50_Weights.IMAGENET1K_V2
    reward = get_reward("resnet50", pretrained=False, weights=path, target=281, recipe=recipe)
    images = torch.rand(3, 3, 300, 260)
    with torch.no_grad():
        ours = reward(images)
        # torchvision's own tensor transform of the recipe (resize, crop, normalise), then the classifier.
        expected = torch.log_softmax(model(weights_enum.transforms()(images)), dim=-1)[:, 281]
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_recipes_resize_differently():
    v1 = get_reward("resnet50", pretrained=False, target=0, recipe="v1")
    v2 = get_reward("resnet50", pretrained=False, target=0, recipe="v2")
    assert (v1.preprocess.resize, v1.preprocess.crop) == (256, 224)
    assert (v2.preprocess.resize, v2.preprocess.crop) == (232, 224)
    assert v1.preprocess.interpolation == "bilinear"


def test_timm_state_dict_loads_strictly(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet50", pretrained=False)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    reward = get_reward("resnet50", pretrained=False, weights=tmp_path / "model.safetensors", target=1)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reward.model.state_dict()[key], value, rtol=0, atol=0)


def test_class_set_is_logsumexp_of_log_probs(checkpoint):
    model, path = checkpoint
    cats = get_reward("resnet50", pretrained=False, weights=path, target="cat")
    listed = get_reward("resnet50", pretrained=False, weights=path, target=[281, "tiger cat", 283, 284, 285])
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ResNet50_Weights.IMAGENET1K_V2.transforms()(images)), dim=-1)
        expected = torch.logsumexp(log_probs[:, 281:286], dim=-1)
        torch.testing.assert_close(cats(images), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(listed(images), expected, rtol=1e-5, atol=1e-5)


def test_logit_output(checkpoint):
    model, path = checkpoint
    reward = get_reward("resnet50", pretrained=False, weights=path, target="tabby", output="logit")
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        expected = model(ResNet50_Weights.IMAGENET1K_V2.transforms()(images))[:, 281]
        torch.testing.assert_close(reward(images), expected, rtol=1e-5, atol=1e-5)


def test_target_names():
    assert resolve_classes("tabby", CATEGORIES) == (281,)
    assert resolve_classes("Persian CAT", CATEGORIES) == (283,)
    assert resolve_classes(["cat", 281], CATEGORIES) == (281, 282, 283, 284, 285)
    assert len(resolve_classes("dog", CATEGORIES)) == 118


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tabbby", r"unknown ImageNet class 'tabbby'.*Did you mean 'tabby'"),
        (1000, r"index 1000 is out of range 0\.\.999"),
        ("cardigan", r"'cardigan' is ambiguous \(indices \[264, 474\]\)"),
        ([], "target is empty"),
        (2.5, "class indices or names"),
    ],
)
def test_bad_targets(target, message):
    with pytest.raises(ValueError, match=message):
        resolve_classes(target, CATEGORIES)


def test_target_is_required():
    with pytest.raises(ValueError, match=r"needs a target class, e\.g\. target=281"):
        get_reward("resnet50", pretrained=False)


def test_bad_recipe_and_output():
    with pytest.raises(ValueError, match=r"recipe must be one of \['v1', 'v2'\]"):
        get_reward("resnet50", pretrained=False, target=0, recipe="v3")
    with pytest.raises(ValueError, match="output must be 'logprob' or 'logit'"):
        get_reward("resnet50", pretrained=False, target=0, output="prob")


def test_strict_loading_reports_every_kind_of_mismatch(tmp_path):
    state = resnet50(weights=None).state_dict()
    state.pop("fc.bias")
    state["head.extra"] = torch.zeros(1)
    state["fc.weight"] = torch.zeros(10, 2048)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(WeightsMismatchError) as info:
        get_reward("resnet50", pretrained=False, weights=tmp_path / "bad.pth", target=0)
    message = str(info.value)
    assert "missing: fc.bias" in message
    assert "unexpected: head.extra" in message
    assert "wrong shape: fc.weight: checkpoint (10, 2048) vs model (1000, 2048)" in message


def test_offline_error_names_hub_file_and_weights_argument():
    with pytest.raises(MissingWeightsError) as info:
        get_reward("resnet50", target="cat")
    message = str(info.value)
    assert "'model.safetensors' of hub repo 'timm/resnet50.tv2_in1k'" in message
    assert "get_reward('resnet50', ..., weights='DIR/model.safetensors')" in message
