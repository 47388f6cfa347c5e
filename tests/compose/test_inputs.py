"""What compose reads: peft scale semantics (rsLoRA, rank/alpha patterns), refused configs, hostile files, the
base model decided from the geometry, and the trainer's own checkpoints."""

import json
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from compose.__main__ import main
from compose.formats import load_lora, save_lora
from compose.geometry import module_shapes
from compose.lora import TRAINED_ON, LoRA, LoRAModule
from compose.ops import mix


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_k = torch.nn.Linear(16, 16), torch.nn.Linear(16, 24)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn1, self.attn2 = Block(), Block()


def peft_model(**config):
    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(init_lora_weights=False, target_modules=["to_q", "to_k"], **config))
    deltas = {
        name: layer.get_delta_weight("default")
        for name, layer in model.base_model.model.named_modules()
        if hasattr(layer, "get_delta_weight") and name.endswith(("to_q", "to_k"))
    }
    return model, deltas


SCALE_CONFIGS = {
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn1.to_q": 3}),
    "rslora+patterns": dict(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"to_k": 6}, alpha_pattern={"to_q": 1}),
}


@pytest.mark.parametrize("name", list(SCALE_CONFIGS))
def test_peft_scale_semantics_in_diffusers_files_and_peft_directories(tmp_path, name):
    """Deltas equal peft's own get_delta_weight, read from diffusers' save_lora_weights and from save_pretrained."""
    model, deltas = peft_model(**SCALE_CONFIGS[name])
    state = {k.replace("base_model.model.", "").replace(".default", ""): v for k, v in model.state_dict().items()}
    layers = {k: v for k, v in state.items() if "lora_" in k}
    config = model.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "d", unet_lora_layers=layers, unet_lora_adapter_metadata=config
    )
    model.save_pretrained(tmp_path / "p")
    for lora in (load_lora(tmp_path / "d"), load_lora(tmp_path / "p")):
        assert set(lora.modules) == {f"unet.{n}" for n in deltas}
        for module, delta in deltas.items():
            torch.testing.assert_close(lora.modules[f"unet.{module}"].delta(), delta, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("field", "value"),
    [("use_dora", True), ("lora_bias", True), ("fan_in_fan_out", True), ("init_lora_weights", "pissa"),
     ("modules_to_save", ["conv"]), ("bias", "all")],
)  # fmt: skip
def test_delta_changing_configs_are_refused(tmp_path, field, value):
    down, up = torch.randn(2, 16), torch.randn(16, 2)
    config = {"unet.r": 2, "unet.lora_alpha": 2, f"unet.{field}": value}
    save_file(
        {"unet.attn1.to_q.lora_A.weight": down, "unet.attn1.to_q.lora_B.weight": up},
        str(tmp_path / "x.safetensors"),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config)},
    )
    with pytest.raises(ValueError, match=rf"x\.safetensors \(unet\): .*{field}={re.escape(repr(value))}"):
        load_lora(tmp_path / "x.safetensors")


def kohya_file(path, down, up, alpha=None, header=None):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
    if alpha is not None:
        tensors[f"{stem}.alpha"] = torch.tensor(alpha)
    save_file(tensors, str(path), metadata=header)
    return path


@pytest.mark.parametrize(
    ("factors", "alpha", "message"),
    [
        ((torch.full((2, 320), float("nan")), torch.randn(320, 2)), 2.0, "down factor contains NaN or Inf"),
        ((torch.randn(2, 320), torch.full((320, 2), float("inf"))), 2.0, "up factor contains NaN or Inf"),
        ((torch.randn(2, 320), torch.randn(320, 2)), float("nan"), "has alpha nan"),
        ((torch.randn(2, 320), torch.randn(320, 2)), float("inf"), "has alpha inf"),
        ((torch.randn(0, 320), torch.randn(320, 0)), 2.0, "has rank 0"),
    ],
)
def test_hostile_files_are_refused_naming_file_and_module_and_nothing_is_written(
    tmp_path, capsys, factors, alpha, message
):
    bad = kohya_file(tmp_path / "bad.safetensors", *factors, alpha)
    good = kohya_file(tmp_path / "good.safetensors", torch.randn(2, 320), torch.randn(320, 2), 2.0)
    expected = rf"bad\.safetensors: module lora_unet_down_blocks_0_.*_attn1_to_q.*{re.escape(message)}"
    with pytest.raises(ValueError, match=expected):
        load_lora(bad)
    assert main(["inspect", str(bad)]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert main(["mix", f"{good}=0.5", f"{bad}=0.5", "-o", str(tmp_path / "out.safetensors")]) == 2
    assert re.search(expected, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "good.safetensors"]


def test_unparseable_metadata_warns_and_is_not_carried(tmp_path, capsys):
    header = {"ss_network_dim": "lots", "ss_network_alpha": "4", "ss_output_name": "kept"}
    path = kohya_file(tmp_path / "k.safetensors", torch.randn(2, 320), torch.randn(320, 2), 4.0, header)
    with pytest.warns(UserWarning, match=r"k\.safetensors: metadata field ss_network_dim='lots' is not a number"):
        lora = load_lora(path)
    assert "ss_network_dim" not in lora.metadata and lora.metadata["ss_output_name"] == "kept"
    assert main(["inspect", str(path)]) == 0
    assert "ss_network_dim" not in json.loads(capsys.readouterr().out)["metadata"]

    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{name}.lora_A.weight": torch.randn(2, 320), f"{name}.lora_B.weight": torch.randn(320, 2)}
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"lora_adapter_metadata": '{"unet.r": 2,'})
    with pytest.warns(UserWarning, match="metadata field lora_adapter_metadata=.* is not valid JSON"):
        lora = load_lora(tmp_path / "d.safetensors")
    assert lora.modules[name].scale == 1.0 and "lora_adapter_metadata" not in lora.metadata
    out = save_lora(lora, tmp_path / "out", "diffusers")
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["lora_adapter_metadata"])["unet.r"] == 2  # written afresh, parseable


def geometry_lora(base, pattern, rank=2):
    """A LoRA on the modules of the real ``base`` geometry whose names match ``pattern``."""
    generator = torch.Generator().manual_seed(0)
    modules = {}
    for name, shape in module_shapes(base).items():
        if re.search(pattern, name):
            up = (shape[0], rank, 1, 1) if len(shape) == 4 else (shape[0], rank)
            down = torch.randn(rank, *shape[1:], generator=generator)
            modules[name] = LoRAModule(down, torch.randn(up, generator=generator), float(rank))
    return LoRA(modules)


def test_base_model_is_inferred_from_the_geometry(tmp_path, capsys):
    # SDXL, proj_in/proj_out only, written as diffusers (no base-model hint at all): an SDXL kohya file comes out.
    sdxl = geometry_lora("sdxl_base_v1-0", r"^unet\..*proj_(in|out)$")
    assert len(sdxl.modules) == 22
    source = save_lora(sdxl, tmp_path / "sdxl", "diffusers")
    assert main(["inspect", str(source)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["format"] == "diffusers"
    assert (
        info["base_model"] == "sdxl_base_v1-0"
        and "only sdxl_base_v1-0 has these 22 modules" in info["base_model_decided_by"]
    )
    assert main(["scale", str(source), "--by", "1", "-o", str(tmp_path / "sdxl.safetensors")]) == 0
    with safe_open(str(tmp_path / "sdxl.safetensors"), "pt") as f:
        header, keys = f.metadata(), list(f.keys())
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    assert header["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert all(
        k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks")) for k in keys
    )

    # SD 2.x: the cross-attention width (1024) decides, without metadata.
    sd2 = save_lora(geometry_lora("sd_v2", r"attn2\.to_[kv]$"), tmp_path / "sd2", "diffusers")
    assert load_lora(sd2).base_model == "sd_v2"
    assert main(["scale", str(sd2), "--by", "1", "-o", str(tmp_path / "sd2.safetensors")]) == 0
    with safe_open(str(tmp_path / "sd2.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sd_v2" and f.metadata()["ss_v2"] == "True"

    # Self-attention of the first block is the same in SD 1.x and 2.x: ambiguous until --base-model says.
    both = save_lora(geometry_lora("sd_v1", r"down_blocks\.0\..*attn1\.to_q$"), tmp_path / "both", "diffusers")
    capsys.readouterr()
    assert main(["inspect", str(both)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] is None and info["geometry_fits"] == ["sd_v1", "sd_v2"]
    assert "ambiguous" in info["base_model_decided_by"] and "--base-model" in info["base_model_decided_by"]
    assert main(["scale", str(both), "--by", "1", "-o", str(tmp_path / "both.safetensors")]) == 2
    assert "ambiguous" in capsys.readouterr().err and not (tmp_path / "both.safetensors").exists()
    assert main(["scale", str(both), "--by", "1", "-o", str(tmp_path / "b.safetensors"), "--base-model", "sd_v2"]) == 0
    assert main(["inspect", str(both), "--base-model", "sdxl_base_v1-0"]) == 2
    assert "do not fit sdxl_base_v1-0's geometry (it fits sd_v1, sd_v2)" in capsys.readouterr().err

    # Mixing decides by the intersection, and refuses different base models naming both files.
    assert main(["mix", f"{both}=1", f"{sd2}=1", "-o", str(tmp_path / "m.safetensors")]) == 0
    assert load_lora(tmp_path / "m.safetensors").base_model == "sd_v2"
    assert main(["mix", f"{sd2}=1", f"{source}=1", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "different base models" in err and "sd2" in err and "sdxl" in err


def test_reads_the_trainers_checkpoints(tmp_path, capsys):
    from finetune.checkpoint import save_checkpoint
    from finetune.config import TrainConfig
    from finetune.pipelines import build_random_pipeline

    unet = build_random_pipeline("tiny").unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    lora = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    assert any(".lora_A.default.weight" in k for k in lora)
    run = tmp_path / "run"
    TrainConfig(lora_rank=4, lora_alpha=8).save(run / "training_config.yaml")
    checkpoint = save_checkpoint(run / "checkpoints", 1, lora, {}, {}, keep=1) / "lora.safetensors"
    assert main(["inspect", str(checkpoint)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "diffusers" and info["ranks"] == [4] and info["alphas"] == [8.0]
    loaded = load_lora(checkpoint)
    for name, layer in unet.named_modules():
        if hasattr(layer, "get_delta_weight"):
            torch.testing.assert_close(loaded.modules[f"unet.{name}"].delta(), layer.get_delta_weight("default"))


def test_custom_geometry_claims_no_base_model_and_keeps_the_trained_on_model(tmp_path):
    """A LoRA whose modules fit no known base model (e.g. the embedded world's UNet) is exported without an SD
    version label, and the model it was trained on (recorded by the trainer) survives a mix that agrees on it."""
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def custom(seed, trained_on):
        generator = torch.Generator().manual_seed(seed)
        module = LoRAModule(torch.randn(2, 24, generator=generator), torch.randn(24, 2, generator=generator), 2.0)
        return LoRA({name: module}, metadata={TRAINED_ON: trained_on})

    mixed = mix([custom(0, "world"), custom(1, "world")], [1.0, 0.5])
    path = save_lora(mixed, tmp_path / "custom.safetensors", "kohya")
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
    assert "ss_base_model_version" not in header and "modelspec.architecture" not in header
    assert header[TRAINED_ON] == "world"
    assert load_lora(path).metadata[TRAINED_ON] == "world"
    assert TRAINED_ON not in mix([custom(0, "world"), custom(1, "other")], [1.0, 1.0]).metadata
