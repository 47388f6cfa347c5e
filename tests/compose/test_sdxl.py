"""SDXL kohya export (Stability UNet names, lora_te1/lora_te2) loaded by diffusers' own SDXL pipeline."""

import io
import logging
import warnings

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from compose.formats import load_lora, save_lora
from compose.lora import LoRA, LoRAModule
from rewards.clip import build_clip_tokenizer

UNET_LAYERS = ("attn", "proj_in", "proj_out", "ff.net", "conv1", "conv2", "downsamplers", "upsamplers")
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def tiny_sdxl_pipeline():
    """SDXL layout at toy width: 2 ResNets per level (as SDXL), 2 transformer blocks, text_time embeddings."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        sample_size=8,
        norm_num_groups=8,
    )
    text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)
    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
    )
    tokenizer = build_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text, projection_dim=32)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def test_sdxl_kohya_export_loads_completely_in_diffusers(tmp_path):
    pipeline = tiny_sdxl_pipeline()
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    modules = {}
    generator = torch.Generator().manual_seed(1)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, layer in getattr(pipeline, component).named_modules():
            if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                continue
            if (component == "unet" and any(x in name for x in UNET_LAYERS)) or name.endswith(TEXT_LAYERS):
                shape = tuple(layer.weight.shape)
                up = (shape[0], 2, 1, 1) if len(shape) == 4 else (shape[0], 2)
                down = torch.randn(2, *shape[1:], generator=generator)
                modules[f"{component}.{name}"] = LoRAModule(down, torch.randn(*up, generator=generator), 3.0)
    lora = LoRA(modules, base_model="sdxl_base_v1-0")
    path = save_lora(lora, tmp_path / "sdxl.safetensors", "kohya")
    assert load_lora(path).modules.keys() == lora.modules.keys()

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipeline.load_lora_weights(str(path))
    finally:
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(handler)
    assert stream.getvalue() == "" and [str(w.message) for w in caught] == []
    loaded = sum(
        ".lora_A." in name
        for component in ("unet", "text_encoder", "text_encoder_2")
        for name, _ in getattr(pipeline, component).named_parameters()
    )
    assert loaded == len(modules)

    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    fused = pipeline.unet.state_dict()
    for name, module in lora.modules.items():
        if name.startswith("unet."):
            key = name[len("unet.") :] + ".weight"
            expected = module.delta()
            assert ((fused[key] - base[key]) - expected).norm() / expected.norm() < 1e-5, name
