"""SD3/SD3.5 and FLUX.1: exact fused <-> separate conversion on the real geometries (meta device), and mixed exports
loaded by diffusers' own FluxPipeline / StableDiffusion3Pipeline on tiny random pipelines."""

import json
import re

import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from compose.formats import detect, load_lora, save_lora
from compose.formats.original import name_table
from compose.geometry import module_shapes
from compose.lora import LoRA, LoRAModule, canonical_name
from compose.ops import mix
from tests.compose.test_compose import Captured


def random_lora(shapes, rank, seed, base=None):
    generator = torch.Generator().manual_seed(seed)
    modules = {}
    for name, shape in shapes.items():
        up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
        down = torch.randn(rank, *shape[1:], generator=generator)
        modules[name] = LoRAModule(down, torch.randn(up, generator=generator), alpha=rank * 1.5)
    return LoRA(modules, base_model=base)


def probe_error(module: LoRAModule, reference: LoRAModule, generator) -> float:
    """Relative difference of the two deltas applied to random inputs (exact for linear maps, no dense delta)."""
    x = torch.randn(module.down.flatten(1).shape[1], 8, generator=generator, dtype=torch.float64)

    def apply(m):
        return m.scale * (m.up.flatten(1).double() @ (m.down.flatten(1).double() @ x))

    expected = apply(reference)
    return float((apply(module) - expected).norm() / expected.norm())


KOHYA_NAME = {
    "flux": re.compile(
        r"lora_unet_(double_blocks_([0-9]|1[0-8])_(img|txt)_(attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin)"
        r"|single_blocks_([0-9]|[12][0-9]|3[0-7])_(linear1|linear2|modulation_lin)"
        r"|img_in|txt_in|(time_in|vector_in|guidance_in)_(in_layer|out_layer)|final_layer_(linear|adaLN_modulation_1))"
        r"|lora_te1_text_model_encoder_layers_([0-9]|1[01])_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    ),
    "sd3": re.compile(
        r"lora_unet_(joint_blocks_\d+_(x_block_(attn2?_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1)"
        r"|context_block_(attn_(qkv|proj)|mlp_fc[12]|adaLN_modulation_1))"
        r"|x_embedder_proj|context_embedder|[ty]_embedder_mlp_[02]|final_layer_(linear|adaLN_modulation_1))"
        r"|lora_te[12]_text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])"
    ),
}
"""Names kohya-ss/sd-scripts writes (lora_flux.py, lora_sd3.py: the original modules with "." -> "_") and
diffusers' _convert_kohya_flux_lora_to_diffusers reads; written from those rules, not from compose's tables."""


def block_count(names, prefix):
    return len({name[len(prefix) :].split(".")[0] for name in names if name.startswith(prefix)})


@pytest.mark.parametrize(
    ("base", "family", "blocks"),
    [("flux-1-dev", "flux", (19, 38)), ("sd3.5-medium", "sd3", (24, 0)), ("sd3.5-large", "sd3", (38, 0))],
)
def test_golden_geometry_round_trips_exactly_through_fused_layouts(tmp_path, base, family, blocks):
    """A rank-1 LoRA on every Linear/Conv of the real transformer (and CLIP) exports to the names sd-scripts writes,
    and every module's delta is the same after separate -> fused -> separate (1e-6 relative)."""
    shapes = module_shapes(base)
    assert block_count(shapes, "transformer.transformer_blocks.") == blocks[0]
    assert block_count(shapes, "transformer.single_transformer_blocks.") == blocks[1]
    lora = random_lora(shapes, 1, seed=0, base=base)
    generator = torch.Generator().manual_seed(1)
    for export in ("kohya", "original"):
        if export == "original":  # the denoiser only
            lora = LoRA({n: m for n, m in lora.modules.items() if n.startswith("transformer.")}, base_model=base)
        path = save_lora(lora, tmp_path / f"{export}.safetensors", export)
        assert detect(path) == export
        with safe_open(str(path), "pt") as f:
            stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in f.keys()}  # noqa: SIM118
            header = f.metadata()
        if export == "kohya":
            assert [s for s in stems if not KOHYA_NAME[family].fullmatch(s)] == []
            assert header["ss_base_model_version"] == {"flux": "flux1"}.get(family, base.replace("sd3.", ""))
        else:
            assert all(s.removeprefix("diffusion_model.") in name_table(family) for s in stems)
        fused = [s for s in stems if s.endswith(("qkv", "linear1"))]
        assert len(fused) == {"flux": 2 * 19 + 38, "sd3": 2 * blocks[0]}[family] + (13 if base == "sd3.5-medium" else 0)
        back = load_lora(path)
        assert back.base_model == base and set(back.modules) == set(lora.modules)
        worst = max(probe_error(back.modules[n], m, generator) for n, m in lora.modules.items())
        assert worst < 1e-6, (export, worst)


def test_flux_kohya_export_is_read_exactly_by_diffusers_converter(tmp_path):
    """diffusers' own kohya -> diffusers FLUX conversion (real geometry, 19 + 38 blocks) recovers every separate
    module's delta from compose's fused export, the swapped final norm included."""
    shapes = {n: s for n, s in module_shapes("flux-1-dev").items() if n.startswith("transformer.")}
    lora = random_lora(shapes, 2, seed=3, base="flux-1-dev")
    path = save_lora(lora, tmp_path / "flux.safetensors", "kohya")
    converted = _convert_kohya_flux_lora_to_diffusers(load_file(str(path)))
    # (diffusers 0.42 leaves the transformer. prefix off the embedders and the final layer)
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    assert len(converted) == 2 * len(lora.modules)
    generator = torch.Generator().manual_seed(2)
    for name, module in lora.modules.items():
        down, up = converted[f"{name}.lora_A.weight"], converted[f"{name}.lora_B.weight"]
        error = probe_error(LoRAModule(down, up, float(down.shape[0])), module, generator)
        assert error < 1e-6, (name, error)


CLIP_OR_DIT = (FluxTransformer2DModel, SD3Transformer2DModel, CLIPTextModel, CLIPTextModelWithProjection)


def clip():
    config = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=49408, projection_dim=32)  # fmt: skip
    return CLIPTextModelWithProjection(config)


def tiny_flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True,
    )  # fmt: skip
    text = CLIPTextModel(clip().config)
    return FluxPipeline(scheduler=None, vae=None, text_encoder=text, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)  # fmt: skip


def tiny_sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=32,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm",
    )  # fmt: skip
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None, text_encoder=clip(),
                                    tokenizer=None, text_encoder_2=clip(), tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)  # fmt: skip


def components_of(pipeline):
    return [
        c for c in ("transformer", "text_encoder", "text_encoder_2") if isinstance(getattr(pipeline, c), CLIP_OR_DIT)
    ]


def targets(pipeline, keep):
    """name -> weight shape of the pipeline's Linear/Conv2d layers (transformer, CLIP's q/k/v/out/fc1/fc2)."""
    shapes = {}
    for component in components_of(pipeline):
        for name, layer in getattr(pipeline, component).named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                full = canonical_name(f"{component}.{name}")
                if (component == "transformer" or name.endswith(("_proj", "fc1", "fc2"))) and keep(full):
                    shapes[full] = tuple(layer.weight.shape)
    return shapes


KOHYA_FLUX_LOADS = re.compile(
    r"^(text_encoder|transformer\.(transformer_blocks|single_transformer_blocks\.\d+\.(proj_out|norm)))"
)
"""What diffusers 0.42's kohya FLUX loader can take on a tiny model: it hard-codes the real single-block widths
(3072 x 3 + 12288) for linear1 and drops the embedders and the final layer (no transformer. prefix); both are
covered at the real geometry by the converter test above."""
CASES = {
    ("flux", "diffusers"): (tiny_flux, lambda n: True),
    ("flux", "kohya"): (tiny_flux, KOHYA_FLUX_LOADS.match),
    ("sd3", "diffusers"): (tiny_sd3, lambda n: True),
}


@pytest.mark.parametrize(("family", "export"), list(CASES))
def test_mixed_export_loads_in_diffusers_pipeline_completely_and_exactly(tmp_path, family, export):
    build, keep = CASES[(family, export)]
    pipeline = build()
    shapes = targets(pipeline, keep)
    base_model = {"flux": "flux-1-dev", "sd3": "sd3.5-medium"}[family]  # a tiny geometry: the family is declared
    lora_a = random_lora(shapes, 4, seed=1, base=base_model)
    partial = {n: s for n, s in shapes.items() if ".ff" not in n}  # B leaves the MLPs out
    lora_b = random_lora(partial, 8, seed=2, base=base_model)
    weights = (0.7, -0.3)
    mixed = mix([lora_a, lora_b], weights)
    path = save_lora(mixed, tmp_path / ("m.safetensors" if export == "kohya" else "m"), export)

    components = components_of(pipeline)
    base = {c: {k: v.clone() for k, v in getattr(pipeline, c).state_dict().items()} for c in components}
    with Captured() as captured:
        pipeline.load_lora_weights(str(path.parent if export == "diffusers" else path), adapter_name="m")
    assert captured.messages == []
    loaded = sum(".lora_A." in n for c in base for n, _ in getattr(pipeline, c).named_parameters())
    assert loaded == len(mixed.modules) == len(shapes)

    pipeline.fuse_lora(components=components)  # FluxPipeline fuses the transformer alone by default
    pipeline.unload_lora_weights()
    for component, reference in base.items():
        fused = getattr(pipeline, component).state_dict()
        for key, value in reference.items():
            name = canonical_name(f"{component}.{key.rsplit('.', 1)[0]}")
            if key.endswith(".weight") and name in shapes:
                delta = weights[0] * lora_a.modules[name].delta()
                if name in lora_b.modules:
                    delta += weights[1] * lora_b.modules[name].delta()
                error = (fused[key] - value - delta).norm() / delta.norm()
                assert error < 1e-5, (key, float(error))
            else:
                assert torch.equal(fused[key], value), f"{key} is not targeted but changed"


def full_pipeline(family):
    """A complete tiny pipeline (every component, so that it saves and loads as a directory); the T5 tokenizer
    is stood in for by the offline CLIP one, which loading does not care about."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    from rewards.clip import build_clip_tokenizer

    pipeline = tiny_flux() if family == "flux" else tiny_sd3()
    tokenizer = build_clip_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=49408, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), norm_num_groups=8, latent_channels=4)  # fmt: skip
    parts = dict(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, tokenizer=tokenizer, tokenizer_2=tokenizer)
    if family == "flux":
        return FluxPipeline(
            **parts, text_encoder=pipeline.text_encoder, text_encoder_2=t5, transformer=pipeline.transformer
        )
    encoders = dict(text_encoder=pipeline.text_encoder, text_encoder_2=pipeline.text_encoder_2, text_encoder_3=t5)
    return StableDiffusion3Pipeline(**parts, **encoders, tokenizer_3=tokenizer, transformer=pipeline.transformer)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_cli_mix_inspect_and_fuse_a_full_pipeline(tmp_path, capsys, family):
    from compose.__main__ import main

    pipeline = full_pipeline(family)
    base_dir = tmp_path / "base"
    pipeline.save_pretrained(base_dir)
    base_model = {"flux": "flux-1-dev", "sd3": "sd3.5-medium"}[family]
    shapes = targets(pipeline, lambda n: True)
    paths = []
    for seed, export in ((1, "kohya"), (2, "diffusers")):
        lora = random_lora(shapes, 2, seed=seed, base=base_model)
        paths.append(save_lora(lora, tmp_path / f"{seed}.safetensors", export))
    assert main(["inspect", str(paths[0]), "--base-model", base_model]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] == base_model and "custom geometry" in info["base_model_decided_by"]
    assert info["format"] == "kohya" and info["family"] == family
    mixed = tmp_path / "mixed.safetensors"
    flags = ["--base-model", base_model]
    assert main(["mix", f"{paths[0]}=0.7", f"{paths[1]}=-0.3", "-o", str(mixed), *flags]) == 0
    assert main(["mix", f"{paths[0]}=1", "-o", str(mixed), *flags]) == 2  # never overwrites
    assert main(["fuse", str(mixed), "--base", str(base_dir), "--by", "0.5", "-o", str(tmp_path / "fused")]) == 0
    capsys.readouterr()

    expected = mix([load_lora(p, base_model) for p in paths], [0.35, -0.15])
    fused = type(pipeline).from_pretrained(str(tmp_path / "fused"))
    for component in components_of(pipeline):
        before, after = getattr(pipeline, component).state_dict(), getattr(fused, component).state_dict()
        for key, value in before.items():
            name = canonical_name(f"{component}.{key.rsplit('.', 1)[0]}")
            if key.endswith(".weight") and name in expected.modules:
                delta = expected.modules[name].delta()
                assert (after[key] - value - delta).norm() / delta.norm() < 1e-5, key
            else:
                assert torch.equal(after[key], value), key


def test_mixing_families_is_refused_naming_both(tmp_path, capsys):
    from compose.__main__ import main

    flux = {n: s for n, s in module_shapes("flux-1-dev").items() if n.endswith("single_transformer_blocks.0.proj_out")}
    sdxl = {n: s for n, s in module_shapes("sdxl_base_v1-0").items() if n.endswith("up_blocks.0.attentions.0.proj_in")}
    a = save_lora(random_lora(flux, 2, seed=0), tmp_path / "flux.safetensors", "diffusers")
    b = save_lora(random_lora(sdxl, 2, seed=1), tmp_path / "sdxl.safetensors", "diffusers")
    assert load_lora(a).base_model == "flux-1-dev" and load_lora(b).base_model == "sdxl_base_v1-0"
    assert main(["mix", f"{a}=1", f"{b}=1", "-o", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"different base models: .*flux\.safetensors \(flux-1-dev\) and .*sdxl\.safetensors \(sdxl", err)
    assert not (tmp_path / "m.safetensors").exists()
