"""PickScore: real geometry, the transformers layout loaded strictly, and the published recipe computed
independently (transformers CLIPModel + open_clip's tokenizer + torchvision resize, no project code)."""

import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from transformers import CLIPConfig, CLIPModel

from rewards import MissingWeightsError, WeightsMismatchError, get_reward
from rewards.pickscore import TEXT_VIT_H_14, VISION_VIT_H_14, pickscore_config

PROMPTS = ["a photo of a red fox in the snow", "an oil painting of a lighthouse"]


def test_real_geometry_on_meta_device():
    with torch.device("meta"):
        model = CLIPModel(pickscore_config())
    assert sum(p.numel() for p in model.parameters()) == 986_109_441
    assert VISION_VIT_H_14["hidden_act"] == "gelu" and TEXT_VIT_H_14["hidden_act"] == "gelu"
    keys = set(model.state_dict())
    assert {"logit_scale", "visual_projection.weight", "text_projection.weight"} <= keys
    assert "vision_model.pre_layrnorm.weight" in keys and "vision_model.encoder.layers.31.mlp.fc2.weight" in keys


def reference_pickscore(directory, images, prompts):
    """The PickScore README recipe: processor (resize 224 bicubic, crop, CLIP mean/std), tokenizer (CLIP BPE, 77),
    normalise both embeddings, score = exp(logit_scale) * dot."""
    import open_clip

    model = CLIPModel.from_pretrained(directory).eval()
    x = TF.resize(images, [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
    x = TF.normalize(x, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    tokens = open_clip.get_tokenizer("ViT-H-14")(prompts)
    with torch.no_grad():
        image = model.get_image_features(pixel_values=x)
        text = model.get_text_features(input_ids=tokens)
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (image * text).sum(dim=-1)


@pytest.mark.slow
def test_full_width_checkpoint_loads_strictly_and_matches_the_reference(tmp_path):
    """Full CLIP-H width (1280/1024, real vocabulary and projections) with 2 layers per tower, saved by
    save_pretrained like yuvalkirstain/PickScore_v1, with logit_scale set to ln(100) as in trained CLIP-H."""
    config = pickscore_config()
    config.vision_config.num_hidden_layers = 2
    config.text_config.num_hidden_layers = 2
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(torch.log(torch.tensor(100.0)))
    model.save_pretrained(tmp_path / "PickScore_v1")
    reward = get_reward("pickscore", pretrained=False, weights=tmp_path / "PickScore_v1")
    images = torch.rand(2, 3, 256, 256)
    with torch.no_grad():
        ours = reward(images, PROMPTS)
    expected = reference_pickscore(tmp_path / "PickScore_v1", images, PROMPTS)
    torch.testing.assert_close(ours, expected, rtol=1e-3, atol=0)
    assert (expected[0] - expected[1]).abs() > 1e-3


def test_tiny_matches_reference_and_caches_text(tmp_path):
    model = CLIPModel(pickscore_config(tiny=True))
    model.save_pretrained(tmp_path / "tiny")
    reward = get_reward("pickscore", pretrained=False, weights=tmp_path / "tiny")
    images = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        first = reward(images, PROMPTS)
        again = reward(images, PROMPTS[::-1][::-1])
    torch.testing.assert_close(first, reference_pickscore(tmp_path / "tiny", images, PROMPTS), rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(first, again)
    assert len(reward.prompt_cache) == 2


def test_text_cache_keeps_autocast_encodings_apart():
    """Rows encoded under bf16 autocast are not reused in float32 or fp16 scoring (they once were: float32 scores
    then carried bf16 text embeddings, and fp16 autocast after bf16 failed to stack the rows)."""
    reward = get_reward("pickscore", pretrained=False, tiny=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        fresh = get_reward("pickscore", pretrained=False, tiny=True)
        fresh.load_state_dict(reward.state_dict())
        expected = fresh(images, PROMPTS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reward(images, PROMPTS)
        torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=0, atol=0)
        with torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(reward(images, PROMPTS)).all()
    assert len(reward.prompt_cache) == 6


def test_strict_loading_and_offline_error(tmp_path):
    state = CLIPModel(pickscore_config(tiny=True)).state_dict()
    state.pop("logit_scale")
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsMismatchError, match="missing: logit_scale"):
        get_reward("pickscore", pretrained=False, tiny=True, weights=tmp_path / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError, match=r"yuvalkirstain/PickScore_v1.*weights='DIR'"):
        get_reward("pickscore")


def test_wrong_activation_config_is_not_the_same_model(tmp_path):
    """The gelu/quick_gelu trap: the same weights under the transformers default activation score differently."""
    model = CLIPModel(pickscore_config(tiny=True))
    model.save_pretrained(tmp_path / "gelu")
    wrong = CLIPConfig.from_pretrained(tmp_path / "gelu")
    wrong.vision_config.hidden_act = wrong.text_config.hidden_act = "quick_gelu"
    CLIPModel(wrong).save_pretrained(tmp_path / "quick")
    torch.save(model.state_dict(), tmp_path / "quick" / "pytorch_model.bin")
    (tmp_path / "quick" / "model.safetensors").unlink()
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        right = get_reward("pickscore", pretrained=False, weights=tmp_path / "gelu")(images, PROMPTS[:1])
        trapped = get_reward("pickscore", pretrained=False, weights=tmp_path / "quick")(images, PROMPTS[:1])
    assert (right - trapped).abs().item() > 1e-4


@pytest.mark.slow
def test_real_geometry_directory_loads_strictly(tmp_path):
    """A save_pretrained-layout directory with the real PickScore_v1 config and random fp16 weights (986M)."""
    from safetensors.torch import save_file

    config = pickscore_config()
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPModel(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (0.02 * torch.randn(shape, generator=generator)).half() for k, shape in shapes.items()}
    (tmp_path / "PickScore_v1").mkdir()
    config.to_json_file(tmp_path / "PickScore_v1" / "config.json")
    save_file(state, str(tmp_path / "PickScore_v1" / "model.safetensors"))
    probe = {k: state[k].float() for k in ("logit_scale", "visual_projection.weight", "text_projection.weight")}
    del state
    reward = get_reward("pickscore", pretrained=False, weights=tmp_path / "PickScore_v1")
    assert reward.model.config.vision_config.num_hidden_layers == 32
    assert reward.model.config.vision_config.hidden_act == "gelu"
    for key, value in probe.items():
        torch.testing.assert_close(reward.model.state_dict()[key], value, rtol=0, atol=0)
