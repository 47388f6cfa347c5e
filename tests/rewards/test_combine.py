"""Weighted multi-reward objectives."""

import pytest
import torch

from rewards import CombinedReward, Reward, combine, get_reward, parse_reward_spec


@pytest.fixture
def x():
    return torch.rand(4, 3, 16, 16)


def test_operators_give_weighted_sum(x):
    bright, sat = get_reward("brightness"), get_reward("saturation")
    mix = 0.7 * bright + 0.3 * sat
    assert isinstance(mix, CombinedReward) and isinstance(mix, Reward)
    torch.testing.assert_close(mix(x), 0.7 * bright(x) + 0.3 * sat(x))
    assert set(mix.last_scores) == {"brightness", "saturation"}
    torch.testing.assert_close(mix.last_scores["saturation"], sat(x))
    assert mix.name == "0.7*brightness + 0.3*saturation"


def test_subtraction_negation_division_and_sum(x):
    bright, con = get_reward("brightness"), get_reward("contrast")
    torch.testing.assert_close((bright - con)(x), bright(x) - con(x))
    torch.testing.assert_close((-bright)(x), -bright(x))
    torch.testing.assert_close((bright / 4)(x), bright(x) / 4)
    torch.testing.assert_close(sum([bright, con])(x), bright(x) + con(x))
    torch.testing.assert_close((2 * (bright + con))(x), 2 * bright(x) + 2 * con(x))


def test_same_module_twice_adds_weights(x):
    bright = get_reward("brightness")
    mix = 0.5 * bright + 0.25 * bright
    assert mix.weights == {"brightness": 0.75}
    torch.testing.assert_close(mix(x), 0.75 * bright(x))


def test_two_instances_of_one_reward_get_distinct_names(x):
    red = get_reward("target-color", color="red")
    blue = get_reward("target-color", color="blue")
    mix = red - 0.5 * blue
    assert list(mix.members) == ["target-color", "target-color_2"]
    torch.testing.assert_close(mix(x), red(x) - 0.5 * blue(x))


def test_combine_from_spec_and_mapping(x):
    from_spec = combine("brightness=0.7, saturation=0.3")
    from_map = combine({"brightness": 0.7, "saturation": 0.3})
    expected = 0.7 * get_reward("brightness")(x) + 0.3 * get_reward("saturation")(x)
    torch.testing.assert_close(from_spec(x), expected)
    torch.testing.assert_close(from_map(x), expected)


def test_combine_accepts_built_rewards_with_options(x):
    red = get_reward("target-color", color="#ff0000")
    mix = combine([(red, 2.0), ("brightness", -1.0)])
    torch.testing.assert_close(mix(x), 2 * red(x) - get_reward("brightness")(x))


def test_normalization_defaults_and_overrides(x):
    bright = get_reward("brightness")
    mean, std = bright.normalization
    mix = combine({"brightness": 2.0}, normalize=True)
    torch.testing.assert_close(mix(x), 2.0 * (bright(x) - mean) / std)
    custom = combine({"brightness": 1.0, "contrast": 1.0}, normalize={"contrast": (0.1, 0.5)})
    con = get_reward("contrast")
    torch.testing.assert_close(custom(x), (bright(x) - mean) / std + (con(x) - 0.1) / 0.5)
    with pytest.raises(ValueError, match=r"normalize names \['saturation'\], which are not members"):
        combine({"brightness": 1.0}, normalize={"saturation": (0, 1)})


def test_gradient_flows_through_every_member():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    mix = 1.0 * get_reward("resnet50", pretrained=False, target="cat") + get_reward("brightness")
    mix(x).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_needs_prompts_propagates():
    class WithPrompts(Reward):
        name = "with-prompts"
        needs_prompts = True

        def score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    mix = get_reward("brightness") + WithPrompts()
    assert mix.needs_prompts
    with pytest.raises(ValueError, match="needs prompts"):
        mix(torch.rand(1, 3, 8, 8))
    assert mix(torch.rand(1, 3, 8, 8), ["a prompt"]).shape == (1,)


def test_mixed_dtypes_each_member_uses_its_own():
    x = torch.rand(2, 3, 32, 32)
    low = get_reward("resnet50", pretrained=False, target=3, dtype=torch.bfloat16)
    full = get_reward("resnet50", pretrained=False, target=3)
    full.load_state_dict({k: v.float() for k, v in low.state_dict().items()})
    mix = low + full
    with torch.no_grad():
        out = mix(x)
        torch.testing.assert_close(mix.last_scores["resnet50_2"], full(x))
    assert out.dtype == torch.float32


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "empty reward spec"), ("a=x", r"bad weight 'x' for 'a'"), ("a=1,a=2", "appears twice")],
)
def test_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(spec)


def test_spec_bare_name_means_weight_one():
    assert parse_reward_spec("aesthetic,hpsv2=0.5") == {"aesthetic": 1.0, "hpsv2": 0.5}


def test_unknown_member_name_in_combine():
    with pytest.raises(ValueError, match=r"unknown reward 'brightnes'.*Did you mean 'brightness'"):
        combine("brightnes=1")


def test_same_module_with_different_normalization_stays_separate(x):
    bright = get_reward("brightness")
    mean, std = bright.normalization
    normalized = combine([(bright, 1.0)], normalize=True)
    expected = (bright(x) - mean) / std + bright(x)
    torch.testing.assert_close((normalized + bright)(x), expected)
    torch.testing.assert_close((bright + normalized)(x), expected)


class BrightPixels(Reward):
    """Fraction of pixels brighter than 0.5: a hard count, so not differentiable."""

    name = "bright-pixels"
    differentiable = False

    def score(self, images, prompts):
        return (images.mean(dim=1) > 0.5).float().mean(dim=(1, 2))


def test_a_mix_is_differentiable_only_if_every_member_is(x):
    bright, hard = get_reward("brightness"), BrightPixels()
    images = x.requires_grad_(True)
    assert (2 * bright).differentiable and (2 * bright)(images).requires_grad
    assert not hard.differentiable and not hard(images).requires_grad
    for mix in (bright + hard, hard - bright, combine({bright: 1.0, hard: 0.5}, normalize=True)):
        assert not mix.differentiable
        scores = mix(images)
        assert not scores.requires_grad, "a partial gradient would be that of another objective"
        assert not any(value.requires_grad for value in mix.last_scores.values())
    with torch.no_grad():
        torch.testing.assert_close((bright + hard)(x), bright(x) + hard(x))
    # An instance may say otherwise than its class (a reward whose option makes it hard, say).
    soft = BrightPixels()
    soft.differentiable = True
    assert (bright + soft).differentiable and not (bright + hard).differentiable
