"""Random test pipelines, loading, compatibility checks, and the offline CLIP and T5 tokenizers."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from finetune.pipelines import PIPELINE_SIZES, build_random_pipeline, check_pipeline, load_pipeline
from rewards.clip import build_clip_tokenizer


def test_tokenizer_matches_open_clip():
    import open_clip

    ours = build_clip_tokenizer()
    reference = open_clip.get_tokenizer("ViT-L-14")
    assert len(ours) == 49408
    for text in ["a photo of a cat", "An Oil-Painting of a lighthouse, 4k!!  émigré", "word " * 100]:
        ids = ours(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
        expected = reference([text])[0]
        length = int((expected != 0).sum())  # open_clip pads with 0, transformers with <|endoftext|>
        assert torch.equal(ids[:length], expected[:length])
        assert (ids[length:] == 49407).all()


def test_save_and_load_round_trip(tiny_model_dir):
    pipeline = load_pipeline(tiny_model_dir)
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.safety_checker is None
    original = build_random_pipeline("tiny", seed=0)
    for key, value in original.unet.state_dict().items():
        torch.testing.assert_close(pipeline.unet.state_dict()[key], value, rtol=0, atol=0)
    assert pipeline.tokenizer("a cat").input_ids == original.tokenizer("a cat").input_ids


def test_sd15_geometry_has_the_reference_parameter_count():
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **PIPELINE_SIZES["sd15"]["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_unknown_size():
    with pytest.raises(ValueError, match="unknown pipeline size 'huge'; choose from tiny, small, sd15"):
        build_random_pipeline("huge")


def test_not_a_stable_diffusion_pipeline():
    with pytest.raises(ValueError, match=r"expected a diffusers StableDiffusionPipeline.*got Module"):
        check_pipeline(torch.nn.Module())


def test_inpainting_unet_is_refused():
    pipeline = build_random_pipeline("tiny")
    config = dict(pipeline.unet.config)
    config["in_channels"] = 9
    pipeline.unet = UNet2DConditionModel.from_config(config)
    with pytest.raises(ValueError, match=r"not an SD-1\.x/2\.x text-to-image UNet"):
        check_pipeline(pipeline)


def test_missing_model_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"cannot load a diffusers pipeline from .*hf download"):
        load_pipeline(tmp_path / "nope")


def test_t5_tokenizer_is_built_offline_and_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    from finetune.pipelines import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    encoded = tokenizer("a photo of a zebra", padding="max_length", max_length=12).input_ids
    pieces = tokenizer.convert_ids_to_tokens(encoded)
    assert pieces[:3] == ["\u2581a", "\u2581photo", "\u2581of"] and "\u2581z" in pieces  # unknown words split
    assert pieces[pieces.index("</s>") + 1 :] == ["<pad>"] * (12 - pieces.index("</s>") - 1)
    tokenizer.save_pretrained(tmp_path)
    assert (
        T5TokenizerFast.from_pretrained(tmp_path)("a photo of a zebra").input_ids
        == tokenizer("a photo of a zebra").input_ids
    )


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'pixart'; choose from sd, sdxl, sd3, flux"):
        build_random_pipeline("tiny", family="pixart")
