"""LAION aesthetic rewards: real heads, reference layouts, and the reference recipe computed independently."""

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.clip import CLIP_VIT_L_14, tiny_config
from tests.helpers import V1_HEAD, V2_HEAD, reference_weight

V2_HEAD_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def compose_affine(head: torch.nn.Module) -> tuple[float, torch.Tensor]:
    """Collapse a stack of Linear layers (dropouts are identity in eval) into (bias, w) in float64."""
    w = None
    b = None
    for layer in head.modules():
        if isinstance(layer, torch.nn.Linear):
            lw, lb = layer.weight.double(), layer.bias.double()
            w = lw if w is None else lw @ w
            b = lb if b is None else lw @ b + lb
    return b.item(), w.squeeze(0)


def test_real_v2_head_loads_strictly_and_is_affine():
    path = reference_weight(V2_HEAD)
    reward = get_reward("aesthetic", pretrained=False, weights={"head": path})
    assert set(reward.head.state_dict()) == V2_HEAD_KEYS
    reference = torch.load(path, map_location="cpu", weights_only=True)
    for key, value in reference.items():
        torch.testing.assert_close(reward.head.state_dict()[key], value, rtol=0, atol=0)
    bias, w = compose_affine(reward.head)
    assert bias == pytest.approx(5.2366, abs=1e-4)
    assert w.norm().item() == pytest.approx(17.996, abs=1e-3)
    embeddings = F.normalize(torch.randn(16, 768, dtype=torch.float64), dim=-1)
    with torch.no_grad():
        sequential = reward.head.double()(embeddings).squeeze(-1)
    torch.testing.assert_close(sequential, bias + embeddings @ w, rtol=0, atol=1e-6)


def test_real_v1_head_loads_strictly():
    path = reference_weight(V1_HEAD)
    reward = get_reward("aesthetic-v1", pretrained=False, tiny=True, weights={"head": path})
    assert reward.head.bias.item() == pytest.approx(3.5294, abs=1e-4)
    assert reward.head.weight.norm().item() == pytest.approx(28.444, abs=1e-3)


def test_v1_head_file_refused_by_v2():
    path = reference_weight(V1_HEAD)
    with pytest.raises(WeightsMismatchError, match=r"missing: layers\.0\.bias.*unexpected: bias, weight"):
        get_reward("aesthetic", pretrained=False, tiny=True, weights={"head": path})


def reference_score(clip_dir, head_state, images):
    """The reference recipe, written independently: torchvision resize(224, bicubic) + centre crop, clamp to
    [0, 1] (PIL's uint8 saturation), OpenAI normalisation, CLIP image features, L2 normalisation, the MLP."""
    x = TF.resize(images, [224], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.center_crop(x, [224, 224])
    x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    model = CLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        features = model.get_image_features(pixel_values=x)
        features = features.pooler_output if hasattr(features, "pooler_output") else features
        e = features / features.norm(dim=-1, keepdim=True)
        for i in (0, 2, 4, 6, 7):
            e = F.linear(e, head_state[f"layers.{i}.weight"], head_state[f"layers.{i}.bias"])
    return e.squeeze(-1)


def save_random_head(path):
    head_state = {}
    for i, (n_in, n_out) in zip((0, 2, 4, 6, 7), [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)], strict=True):
        head_state[f"layers.{i}.weight"] = torch.randn(n_out, n_in) / n_in**0.5
        head_state[f"layers.{i}.bias"] = torch.randn(n_out) * 0.1
    torch.save(head_state, path)
    return head_state


@pytest.mark.slow
def test_random_vit_l14_in_reference_layouts_matches_reference_recipe(tmp_path):
    vision = {k: v for k, v in CLIP_VIT_L_14.items() if k != "projection_dim"}
    text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
    config = CLIPConfig(vision_config=vision, text_config=text, projection_dim=768)
    CLIPModel(config).save_pretrained(tmp_path / "clip-vit-large-patch14")
    head_state = save_random_head(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")

    reward = get_reward(
        "aesthetic",
        pretrained=False,
        weights={"clip": tmp_path / "clip-vit-large-patch14", "head": tmp_path / "sac+logos+ava1-l14-linearMSE.pth"},
    )
    assert reward.clip.config.num_hidden_layers == 24 and reward.clip.config.hidden_size == 1024
    images = torch.rand(2, 3, 256, 320)
    with torch.no_grad():
        ours = reward(images)
    expected = reference_score(tmp_path / "clip-vit-large-patch14", head_state, images)
    assert (ours - expected).abs().max().item() < 1e-4


def test_tiny_clip_directories_round_trip(tmp_path):
    config = CLIPVisionConfig(**tiny_config(CLIP_VIT_L_14))
    vision_only = CLIPVisionModelWithProjection(config)
    vision_only.save_pretrained(tmp_path / "vision")
    reward = get_reward("aesthetic", pretrained=False, weights={"clip": tmp_path / "vision"})
    for key, value in vision_only.state_dict().items():
        torch.testing.assert_close(reward.clip.state_dict()[key], value, rtol=0, atol=0)

    full = CLIPConfig(
        vision_config={k: v for k, v in tiny_config(CLIP_VIT_L_14).items() if k != "projection_dim"},
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
        projection_dim=768,
    )
    CLIPModel(full).save_pretrained(tmp_path / "full")
    reward = get_reward("aesthetic-v1", pretrained=False, weights={"clip": str(tmp_path / "full")})
    assert reward.clip.config.projection_dim == 768


def test_clip_with_wrong_projection_width(tmp_path):
    config = CLIPVisionConfig(**{**tiny_config(CLIP_VIT_L_14), "projection_dim": 512})
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "b32")
    with pytest.raises(WeightsMismatchError, match=r"projects to 512 dimensions but the head expects 768"):
        get_reward("aesthetic", pretrained=False, weights={"clip": tmp_path / "b32"})


def test_clip_state_dict_file_with_missing_keys(tmp_path):
    from safetensors.torch import save_file

    state = CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_config(CLIP_VIT_L_14))).state_dict()
    state.pop("visual_projection.weight")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(WeightsMismatchError, match=r"missing: visual_projection\.weight"):
        get_reward("aesthetic", pretrained=False, tiny=True, weights={"clip": tmp_path / "model.safetensors"})


def test_offline_error_names_clip_repo_and_weights_argument():
    with pytest.raises(MissingWeightsError) as info:
        get_reward("aesthetic")
    message = str(info.value)
    assert "openai/clip-vit-large-patch14" in message
    assert "hf download openai/clip-vit-large-patch14" in message
    # every file the reward needs: the CLIP directory and the head
    assert "hf download openai/clip-vit-large-patch14 config.json model.safetensors --revision" in message
    assert "curl -L -o 'HEAD_DIR/sac+logos+ava1-l14-linearMSE.pth'" in message
    assert "weights={'clip': 'CLIP_DIR', 'head': 'HEAD_DIR/sac+logos+ava1-l14-linearMSE.pth'}" in message


def test_offline_error_names_head_file_and_url(tmp_path):
    CLIPVisionModelWithProjection(CLIPVisionConfig(**tiny_config(CLIP_VIT_L_14))).save_pretrained(tmp_path / "c")
    with pytest.raises(MissingWeightsError) as info:
        get_reward("aesthetic", weights={"clip": tmp_path / "c"})
    message = str(info.value)
    assert "improved-aesthetic-predictor" in message and "component 'head'" in message
    assert f"weights={{'clip': '{tmp_path / 'c'}', 'head': 'HEAD_DIR/sac+logos+ava1-l14-linearMSE.pth'}}" in message
    assert "hf download" not in message  # the CLIP directory was given


def test_tiny_has_no_pretrained_weights():
    with pytest.raises(ValueError, match="tiny=True has no pretrained weights"):
        get_reward("aesthetic", tiny=True)


def test_vit_l14_geometry_is_the_reference():
    """Pinned by hand from REWARDS.md (HF config of openai/clip-vit-large-patch14), not from the code's constant."""
    assert (
        dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            patch_size=14,
            image_size=224,
            projection_dim=768,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
        )
        == CLIP_VIT_L_14
    )


def test_tiny_score_matches_reference_recipe(tmp_path):
    """Fast version of the slow ViT-L/14 check (catches a missing L2 normalisation in the default suite)."""
    vision = {k: v for k, v in tiny_config(CLIP_VIT_L_14).items() if k != "projection_dim"}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=768)).save_pretrained(tmp_path / "c")
    head_state = save_random_head(tmp_path / "head.pth")
    reward = get_reward("aesthetic", pretrained=False, weights={"clip": tmp_path / "c", "head": tmp_path / "head.pth"})
    images = torch.rand(3, 3, 230, 300)
    with torch.no_grad():
        ours = reward(images)
    expected = reference_score(tmp_path / "c", head_state, images)
    assert (ours - expected).abs().max().item() < 1e-4
    assert (expected.max() - expected.min()).item() > 1e-3
