"""HPSv2/2.1: real geometry, the {"state_dict": ...} checkpoint layout loaded strictly, and the HPS recipe
computed independently (open_clip model API + open_clip tokenizer + torchvision resize/pad, no project code).
The reference's resize does not clamp; ours does (the one difference, checked on its own below)."""

import pytest
import torch
from open_clip import get_tokenizer
from open_clip.model import CLIP
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.hps import HPSReward, vit_h_14
from rewards.transforms import resize_longer_side_and_pad

PROMPTS = ["a watercolor of a mountain village", "a close-up photo of a hummingbird"]


def test_real_geometry_on_meta_device():
    with torch.device("meta"):
        model = CLIP(**vit_h_14())
    assert sum(p.numel() for p in model.parameters()) == 986_109_441
    assert sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual.")) == 632_076_800
    assert "transformer.resblocks.23.attn.in_proj_weight" in model.state_dict()


def reference_resize_max_size(images):
    """tgxs002/HPSv2 ``ResizeMaxSize(224)`` on ToTensor() images: torchvision's bicubic tensor resize of the longer
    side to 224 (no clamp), zero padding to a centred square."""
    h, w = images.shape[-2:]
    scale = 224 / max(h, w)
    new = [round(h * scale), round(w * scale)]
    x = TF.resize(images, new, interpolation=InterpolationMode.BICUBIC, antialias=True)
    top, left = (224 - new[0]) // 2, (224 - new[1]) // 2
    return TF.pad(x, [left, top, 224 - new[1] - left, 224 - new[0] - top], fill=0.0)


def reference_hps(model, images, prompts):
    """tgxs002/HPSv2 img_score: ResizeMaxSize(224), OpenAI mean/std, normalised image and text features,
    score = diag(image @ text.T)."""
    x = TF.normalize(reference_resize_max_size(images), [0.48145466, 0.4578275, 0.40821073],
                     [0.26862954, 0.26130258, 0.27577711])  # fmt: skip
    with torch.no_grad():
        image = model.encode_image(x, normalize=True)
        text = model.encode_text(get_tokenizer("ViT-H-14")(prompts), normalize=True)
    return torch.diagonal(image @ text.T)


def test_resize_is_the_reference_clamped_to_the_pixel_range():
    """The one difference from the reference's resize (stated in the model cards): ours clamps the bicubic
    overshoot to [0, 1]. It shows at hard edges between saturated regions (here a black and white checkerboard),
    and nowhere else."""
    squares = (torch.arange(512)[:, None] // 32 + torch.arange(384)[None] // 32) % 2
    images = torch.cat([squares.float().expand(1, 3, 512, 384), torch.rand(1, 3, 512, 384)])
    reference = reference_resize_max_size(images)
    ours = resize_longer_side_and_pad(images, 224)
    torch.testing.assert_close(ours, reference.clamp(0, 1), rtol=0, atol=1e-6)
    overshoot = (reference - reference.clamp(0, 1)).abs().amax(dim=(1, 2, 3))
    assert overshoot[0] > 0.02 and overshoot[1] == 0


@pytest.mark.slow
def test_real_geometry_loads_a_reference_layout_checkpoint_strictly(tmp_path):
    """A random fp16 {"state_dict": ...} file with every key and shape of HPS_v2_compressed.pt (986M parameters)."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIP(**vit_h_14()).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (0.02 * torch.randn(shape, generator=generator)).half() for k, shape in shapes.items()}
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    probe = {
        k: state[k].float() for k in ("visual.proj", "text_projection", "transformer.resblocks.23.mlp.c_proj.bias")
    }
    del state
    reward = get_reward("hpsv2", pretrained=False, weights=tmp_path / "HPS_v2_compressed.pt")
    loaded = reward.model.state_dict()
    for key, value in probe.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    with torch.no_grad():
        assert torch.isfinite(reward(torch.rand(1, 3, 224, 224), PROMPTS[:1])).all()


@pytest.mark.slow
def test_full_width_model_scores_like_the_reference():
    """Full ViT-H/14 width with 2 layers per tower (fp16-rounded weights, as in the compressed files)."""
    config = vit_h_14()
    config = {
        **config,
        "vision_cfg": {**config["vision_cfg"], "layers": 2},
        "text_cfg": {**config["text_cfg"], "layers": 2},
    }
    model = CLIP(**config).eval()
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    reward = HPSReward(model, (0.26, 0.28), (0.27, 0.01))
    images = torch.rand(2, 3, 256, 192)
    with torch.no_grad():
        ours = reward(images, PROMPTS)
    torch.testing.assert_close(ours, reference_hps(model, images, PROMPTS), rtol=1e-3, atol=1e-5)


def test_tiny_checkpoint_round_trip_matches_reference(tmp_path):
    model = CLIP(**vit_h_14(tiny=True)).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "tiny.pt")
    reward = get_reward("hpsv2", pretrained=False, tiny=True, weights=tmp_path / "tiny.pt")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(reward.model.state_dict()[key], value, rtol=0, atol=0)
    for shape in [(2, 3, 224, 224), (2, 3, 300, 200)]:
        images = torch.rand(*shape)
        with torch.no_grad():
            torch.testing.assert_close(
                reward(images, PROMPTS), reference_hps(model, images, PROMPTS), rtol=1e-3, atol=1e-5
            )


def test_layout_errors_and_offline_message(tmp_path):
    torch.save(CLIP(**vit_h_14(tiny=True)).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(WeightsMismatchError, match=r"has no 'state_dict' entry"):
        get_reward("hpsv2", pretrained=False, tiny=True, weights=tmp_path / "bare.pt")
    with pytest.raises(MissingWeightsError, match=r"'HPS_v2.1_compressed.pt' of hub repo 'xswu/HPSv2'"):
        get_reward("hpsv2.1")
