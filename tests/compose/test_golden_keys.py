"""Golden key lists: a LoRA on every targetable module of the real SD 1.5 UNet and CLIP-L text encoder (built on
the meta device) exports to kohya names that ComfyUI and AUTOMATIC1111 accept, each mapping back to exactly one
module with the right shape. The accepted-name grammar below is written from the loaders' rules (clean room,
../shared/reference/LORA.md sections 3-4), not from compose's own name tables."""

import re

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from compose.formats import load_lora, save_lora
from compose.geometry import UNET_CONFIGS
from compose.lora import LoRA, LoRAModule, canonical_name

ATTENTION = r"(proj_in|proj_out|transformer_blocks_0_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
RESNET = r"(conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_ACCEPTED = re.compile(
    r"lora_unet_("
    rf"down_blocks_[0-3]_(attentions_[01]_{ATTENTION}|resnets_[01]_{RESNET}|downsamplers_0_conv)"
    rf"|up_blocks_[0-3]_(attentions_[0-2]_{ATTENTION}|resnets_[0-2]_{RESNET}|upsamplers_0_conv)"
    rf"|mid_block_(attentions_0_{ATTENTION}|resnets_[01]_{RESNET})"
    r"|conv_in|conv_out|time_embedding_linear_[12])"
)
TEXT_ACCEPTED = re.compile(r"lora_te_text_model_encoder_layers_([0-9]|1[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])")


def targetable(module, prefix):
    text_leaves = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for name, layer in module.named_modules():
        if prefix.startswith("text_encoder") and not name.endswith(text_leaves):
            continue
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            yield f"{prefix}.{name}", tuple(layer.weight.shape)


def rank_one(shape):
    up_shape = (shape[0], 1, 1, 1) if len(shape) == 4 else (shape[0], 1)
    return LoRAModule(torch.randn(1, *shape[1:]) * 0.01, torch.randn(up_shape) * 0.01, alpha=1.0)


def test_sd15_every_module_exports_to_an_accepted_kohya_name(tmp_path):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sd_v1"])
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, vocab_size=49408))  # fmt: skip
    shapes = {canonical_name(n): s for n, s in [*targetable(unet, "unet"), *targetable(text, "text_encoder")]}
    assert len(shapes) > 300
    lora = LoRA({name: rank_one(shape) for name, shape in shapes.items()})
    path = save_lora(lora, tmp_path / "sd15.safetensors", "kohya")

    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
        for stem in stems:
            assert UNET_ACCEPTED.fullmatch(stem) or TEXT_ACCEPTED.fullmatch(stem), f"{stem} is not accepted"
            leaves = {k[len(stem) + 1 :] for k in keys if k.startswith(stem + ".")}
            assert leaves == {"lora_down.weight", "lora_up.weight", "alpha"}, stem
            down, up = f.get_tensor(f"{stem}.lora_down.weight"), f.get_tensor(f"{stem}.lora_up.weight")
            assert up.shape[1] == down.shape[0] == float(f.get_tensor(f"{stem}.alpha"))  # scale 1: strength in factors
    assert len(stems) == len(shapes), "one kohya module per LoRA module, nothing dropped or merged"

    round_trip = load_lora(path)
    assert round_trip.modules.keys() == lora.modules.keys()
    for name, module in round_trip.modules.items():
        assert module.weight_shape == shapes[name]
        torch.testing.assert_close(module.delta(), lora.modules[name].delta(), rtol=1e-5, atol=1e-9)


SGM_ATTENTION = r"(proj_in|proj_out|transformer_blocks_\d_(attn[12]_(to_q|to_k|to_v|to_out_0)|ff_net_0_proj|ff_net_2))"
SGM_RESNET = r"(in_layers_2|out_layers_3|emb_layers_1|skip_connection)"
SDXL_UNET_ACCEPTED = re.compile(
    r"lora_unet_("
    rf"input_blocks_[1245780]_0_{SGM_RESNET}|input_blocks_[4578]_1_{SGM_ATTENTION}|input_blocks_[36]_0_op"
    rf"|middle_block_[02]_{SGM_RESNET}|middle_block_1_{SGM_ATTENTION}"
    rf"|output_blocks_[0-8]_0_{SGM_RESNET}|output_blocks_[0-5]_1_{SGM_ATTENTION}|output_blocks_[25]_2_conv"
    r"|time_embed_[02]|label_emb_0_[02]|input_blocks_0_0|out_2)"
)
"""Stability (SGM) names of the SDXL UNet's layers: input_blocks 1-8 (levels of 2 ResNets + a downsampler),
transformers with 2 and 10 blocks at levels 1 and 2, output_blocks 0-8, upsamplers at output_blocks 2 and 5."""
SDXL_TEXT_ACCEPTED = re.compile(
    r"lora_te1_text_model_encoder_layers_([0-9]|1[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    r"|lora_te2_text_model_encoder_layers_([0-9]|[12][0-9]|3[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
)


def test_sdxl_every_module_exports_to_an_accepted_kohya_name(tmp_path):
    from transformers import CLIPTextModelWithProjection

    with torch.device("meta"):
        unet = UNet2DConditionModel(**UNET_CONFIGS["sdxl_base_v1-0"])  # the real SDXL base geometry
        text_1 = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, vocab_size=49408))  # fmt: skip
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                            num_hidden_layers=32, num_attention_heads=20,
                                                            vocab_size=49408, projection_dim=1280))  # fmt: skip
    shapes = {
        canonical_name(n): s
        for n, s in [
            *targetable(unet, "unet"),
            *targetable(text_1, "text_encoder"),
            *targetable(text_2, "text_encoder_2"),
        ]
    }
    shapes = {n: s for n, s in shapes.items() if "transformer_blocks.1" not in n or ".ff." in n}  # keep the file small
    lora = LoRA({name: rank_one(shape) for name, shape in shapes.items()}, base_model="sdxl_base_v1-0")
    path = save_lora(lora, tmp_path / "sdxl.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    unaccepted = [s for s in stems if not (SDXL_UNET_ACCEPTED.fullmatch(s) or SDXL_TEXT_ACCEPTED.fullmatch(s))]
    assert unaccepted == []
    assert not [s for s in stems if re.search(r"(down|up)_blocks|mid_block", s)], "never mix naming schemes"
    assert len(stems) == len(shapes)
    round_trip = load_lora(path)
    assert round_trip.modules.keys() == lora.modules.keys() and round_trip.base_model == "sdxl_base_v1-0"


def test_text_projection_is_refused():
    lora = LoRA({"text_encoder_2.text_projection": rank_one((1280, 1280))}, base_model="sdxl_base_v1-0")
    with pytest.raises(ValueError, match="text_projection is not a text-encoder layer that UIs load"):
        save_lora(lora, "unused.safetensors", "kohya")
