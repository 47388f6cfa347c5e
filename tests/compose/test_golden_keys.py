"""Golden key lists: a LoRA on every targetable module of the real SD 1.5 UNet and CLIP-L text encoder (built on
the meta device) exports to kohya names that ComfyUI and AUTOMATIC1111 accept, each mapping back to exactly one
module with the right shape. The accepted-name grammar below is written from the loaders' rules (clean room,
../shared/reference/LORA.md sections 3-4), not from compose's own name tables."""

import re

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from compose.formats import load_lora, save_lora
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
SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768,
)


def targetable(module, prefix):
    text_leaves = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    for name, layer in module.named_modules():
        if prefix == "text_encoder" and not name.endswith(text_leaves):
            continue
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
            yield f"{prefix}.{name}", tuple(layer.weight.shape)


def rank_one(shape):
    up_shape = (shape[0], 1, 1, 1) if len(shape) == 4 else (shape[0], 1)
    return LoRAModule(torch.randn(1, *shape[1:]) * 0.01, torch.randn(up_shape) * 0.01, alpha=1.0)


def test_sd15_every_module_exports_to_an_accepted_kohya_name(tmp_path):
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
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
