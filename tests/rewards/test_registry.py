"""The timm-style registry: get_reward, list_rewards, register_reward, and the list CLI."""

import subprocess
import sys

import pytest
import torch

from rewards import Reward, get_reward, list_rewards, register_reward
from rewards.__main__ import main
from rewards.registry import _REGISTRY, get_entry


def test_list_rewards_sorted_and_filtered():
    names = list_rewards()
    assert names == sorted(names)
    assert {"aesthetic", "aesthetic-v1", "resnet50", "brightness", "saturation", "contrast", "target-color"} <= set(
        names
    )
    assert list_rewards("aesthetic*") == ["aesthetic", "aesthetic-v1"]
    assert list_rewards("no-such-*") == []


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match=r"unknown reward 'aesthetc'.*Did you mean 'aesthetic'"):
        get_reward("aesthetc")


def test_unknown_name_without_close_match_lists_all():
    with pytest.raises(ValueError, match=r"unknown reward 'zzz'\. Available: aesthetic, "):
        get_reward("zzz")


def test_unknown_option():
    with pytest.raises(ValueError, match=r"unknown option\(s\) colour; accepted options: color"):
        get_reward("target-color", colour="red")


def test_weight_free_reward_rejects_weights():
    with pytest.raises(ValueError, match=r"'brightness' has no weights"):
        get_reward("brightness", weights="x.pth")


def test_multi_component_reward_needs_a_dict():
    expected = r"several weight components \(clip, head\).*weights=\{'clip': 'PATH', 'head': 'PATH'\}"
    with pytest.raises(ValueError, match=expected):
        get_reward("aesthetic", pretrained=False, weights="head.pth")


def test_unknown_component():
    with pytest.raises(ValueError, match=r"no weight component\(s\) mlp; its components are clip, head"):
        get_reward("aesthetic", pretrained=False, weights={"mlp": "x"})


def test_register_custom_reward_is_one_decorated_function():
    @register_reward("test-redness")
    def redness(pretrained=True, weights=None, gain: float = 1.0):
        """Mean red channel, times a gain."""

        class Redness(Reward):
            def score(self, images, prompts):
                return gain * images[:, 0].mean(dim=(1, 2))

        return Redness()

    try:
        reward = get_reward("test-redness", gain=2.0)
        x = torch.rand(2, 3, 4, 4)
        torch.testing.assert_close(reward(x), 2 * x[:, 0].mean(dim=(1, 2)))
        assert reward.name == "test-redness"
        assert "test-redness" in list_rewards()
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test-redness")(redness)
    finally:
        _REGISTRY.pop("test-redness", None)


def test_differentiable_is_declared_at_registration_and_checked_on_build(capsys):
    class Hard(Reward):
        differentiable = False

        def score(self, images, prompts):
            return (images.mean(dim=(1, 2, 3)) > 0.5).float()

    register_reward("test-hard", differentiable=False)(lambda pretrained=True, weights=None: Hard())
    register_reward("test-claims-hard", differentiable=False)(lambda pretrained=True, weights=None: Reward())
    try:
        assert not get_entry("test-hard").differentiable and get_entry("brightness").differentiable
        reward = get_reward("test-hard")
        assert not reward.differentiable and "differentiable=False" in repr(reward)
        assert not reward(torch.rand(2, 3, 4, 4, requires_grad=True)).requires_grad
        with pytest.raises(RuntimeError, match=r"'test-claims-hard' is registered with differentiable=False but"):
            get_reward("test-claims-hard")
        capsys.readouterr()
        assert main(["list", "test-*"]) == 0
        assert [line.split()[:2] for line in capsys.readouterr().out.splitlines()] == [
            ["test-claims-hard", "non-differentiable"],
            ["test-hard", "non-differentiable"],
        ]
    finally:
        _REGISTRY.pop("test-hard", None)
        _REGISTRY.pop("test-claims-hard", None)


def test_device_and_dtype_arguments():
    reward = get_reward("resnet50", pretrained=False, target=1, dtype=torch.bfloat16, device="cpu")
    assert {p.dtype for p in reward.parameters()} == {torch.bfloat16}


def test_cli_list(capsys):
    assert main(["list", "aesthetic*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [["aesthetic", "differentiable"], ["aesthetic-v1", "differentiable"]]
    assert "CLIP ViT-L/14" in out[0]
    assert main(["list", "*-co*"]) == 0  # target-color too
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in out] == [
        ["jpeg-compressibility", "non-differentiable"],
        ["owlvit-count", "non-differentiable"],
        ["target-color", "differentiable"],
        ["yolo-count", "non-differentiable"],
    ]


def test_import_after_install_prints_the_zoo():
    out = subprocess.run(
        [sys.executable, "-c", "from rewards import get_reward, list_rewards; print(list_rewards())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'aesthetic'" in out and "'resnet50'" in out


def test_other_packages_import():
    import compose
    import finetune

    assert compose.__doc__ and finetune.__doc__


def test_package_import_is_light_and_every_export_resolves():
    """``import rewards`` loads no torch (the names are imported on first use); ``rewards.combine`` stays the
    function even after its submodule is imported."""
    script = (
        "import sys, types, rewards\n"
        "light = 'torch' not in sys.modules\n"
        "import rewards.combine\n"
        "names = [getattr(rewards, name) for name in rewards.__all__]\n"
        "exports = sorted(rewards.__all__) == sorted(rewards._EXPORTS)\n"
        "print(light, not isinstance(rewards.combine, types.ModuleType), exports)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True"]
