"""Bad inputs give a clear error naming the problem and the fix."""

import pytest
import torch

from rewards import get_reward
from rewards.base import Reward


class PromptReward(Reward):
    """A minimal prompt-conditioned reward: mean pixel times prompt length (exercises the prompt checks)."""

    name = "needs-prompts"
    needs_prompts = True

    def score(self, images, prompts):
        lengths = torch.tensor([float(len(p)) for p in prompts], device=images.device)
        return images.mean(dim=(1, 2, 3)) * lengths


@pytest.fixture
def reward():
    return get_reward("brightness")


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.rand(3, 8, 8), r"4-D .*got 3-D.*unsqueeze\(0\)"),
        (torch.rand(8, 8), r"4-D .*got 2-D"),
        (torch.rand(1, 1, 3, 8, 8), r"4-D .*got 5-D"),
        (torch.rand(2, 1, 8, 8), r"3 RGB channels.*\(2, 1, 8, 8\)"),
        (torch.rand(2, 4, 8, 8), r"3 RGB channels"),
        (torch.rand(2, 8, 8, 3), r"channels-last.*permute\(0, 3, 1, 2\)"),
        (torch.zeros(0, 3, 8, 8), r"images is empty \(shape \(0, 3, 8, 8\)\)"),
        (torch.zeros(1, 3, 0, 8), r"images is empty \(shape \(1, 3, 0, 8\)\)"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), r"floating-point.*uint8.*\.float\(\) / 255"),
        (torch.randint(0, 2, (2, 3, 8, 8), dtype=torch.int64), r"floating-point.*int64"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, r"\[0, 1\].*look like \[-1, 1\].*\(images / 2 \+ 0\.5\)\.clamp\(0, 1\)"),
        (torch.rand(2, 3, 8, 8) * 255, r"\[0, 1\].*look like \[0, 255\].*images / 255"),
        (torch.rand(2, 3, 8, 8) * 1000, r"\[0, 1\].*rescale"),
        (torch.full((2, 3, 8, 8), float("nan")), r"NaN or Inf"),
        (torch.tensor([0.5, float("inf")]).view(1, 1, 1, 2).expand(1, 3, 2, 2), r"NaN or Inf"),
    ],
)
def test_bad_images(reward, images, message):
    with pytest.raises(ValueError, match=message):
        reward(images)


def test_not_a_tensor(reward):
    with pytest.raises(TypeError, match=r"torch\.Tensor.*ndarray"):
        reward(torch.rand(1, 3, 8, 8).numpy())


def test_small_rounding_outside_range_is_accepted(reward):
    x = torch.rand(1, 3, 8, 8)
    x[0, 0, 0, 0] = 1.0005
    x[0, 0, 0, 1] = -0.0005
    assert torch.isfinite(reward(x)).all()


def test_missing_prompts():
    with pytest.raises(ValueError, match=r"'needs-prompts' needs prompts"):
        PromptReward()(torch.rand(2, 3, 8, 8))


def test_prompt_count_mismatch():
    with pytest.raises(ValueError, match=r"got 3 prompts for 2 images"):
        PromptReward()(torch.rand(2, 3, 8, 8), ["a", "b", "c"])


def test_prompt_count_mismatch_for_reward_without_prompts(reward):
    with pytest.raises(ValueError, match=r"got 1 prompts for 2 images"):
        reward(torch.rand(2, 3, 8, 8), ["a"])


def test_prompts_must_be_strings():
    with pytest.raises(ValueError, match=r"prompts must be strings; got int"):
        PromptReward()(torch.rand(2, 3, 8, 8), ["a", 3])


def test_single_prompt_string_applies_to_every_image():
    x = torch.rand(2, 3, 8, 8)
    scores = PromptReward()(x, "abcd")
    torch.testing.assert_close(scores, x.mean(dim=(1, 2, 3)) * 4)


def test_device_mismatch_named():
    reward = get_reward("resnet50", pretrained=False, target=0).to("meta")
    with pytest.raises(ValueError, match=r"on meta but the images are on cpu.*reward\.to\(images\.device\)"):
        reward(torch.rand(1, 3, 8, 8))


def test_checks_can_be_disabled_for_hot_loops(reward):
    reward.check_inputs = False
    assert reward(torch.rand(1, 3, 8, 8) * 2).shape == (1,)
