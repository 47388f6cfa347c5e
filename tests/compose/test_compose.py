"""LoRA arithmetic and export, checked against diffusers' own loader, fuse and set_adapters on a tiny pipeline."""

import io
import json
import logging
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file

from compose.formats import load_lora, save_lora
from compose.lora import LoRA, LoRAModule
from compose.ops import mix, scale, svd_rerank
from finetune.pipelines import build_random_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
WEIGHTS = (0.7, -0.3)


def save_source_lora(path, rank, alpha, seed):
    """A LoRA made with peft on the tiny pipeline and saved by diffusers' own save_lora_weights (with alpha)."""
    pipeline = build_random_pipeline("tiny")
    torch.manual_seed(seed)
    unet_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=TEXT_TARGETS)
    pipeline.unet.add_adapter(unet_config)
    pipeline.text_encoder.add_adapter(text_config)
    StableDiffusionPipeline.save_lora_weights(
        path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipeline.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    return path


def expected_unet_deltas(path, scale_factor):
    """delta = alpha / r * up @ down for each UNet module of a source file, read without compose's reader."""
    deltas = {}
    with safe_open(str(path / "pytorch_lora_weights.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118
            for down, up in ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight")):
                if key.startswith("unet.") and key.endswith(down):
                    stem = key[len("unet.") : -len(down)]
                    deltas[stem] = scale_factor * f.get_tensor(f"unet.{stem}{up}") @ f.get_tensor(key)
    return deltas


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return save_source_lora(root / "a", 4, 16, seed=1), save_source_lora(root / "b", 8, 8, seed=2)


class Captured:
    """Collects diffusers/peft/transformers log records and Python warnings while loading."""

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        for name in ("diffusers", "peft", "transformers"):
            logging.getLogger(name).addHandler(self.handler)
        self.warnings = warnings.catch_warnings(record=True)
        self.records = self.warnings.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self.warnings.__exit__(*exc)
        for name in ("diffusers", "peft", "transformers"):
            logging.getLogger(name).removeHandler(self.handler)

    @property
    def messages(self):
        """Everything logged or warned, except transformers' per-load report of the frozen base weights, which it
        prints for every text-encoder adapter (its lines name no LoRA key)."""
        lines = [line for line in self.stream.getvalue().splitlines() if line.strip()]
        report = [i for i, line in enumerate(lines) if "LOAD REPORT" in line]
        if report:
            base_weights = lines[report[0] :]
            assert not [line for line in base_weights if "lora" in line.lower()], base_weights
            lines = lines[: report[0]]
        return lines + [str(w.message) for w in self.records]


def unet_output(pipeline):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    text = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return pipeline.unet(latents, torch.tensor(500), encoder_hidden_states=text).sample


@pytest.mark.parametrize("export_format", ["kohya", "diffusers"])
def test_mixed_export_loads_completely_and_exactly(sources, tmp_path, export_format):
    a, b = sources
    mixed = mix([load_lora(a), load_lora(b)], WEIGHTS)
    assert sorted({m.rank for m in mixed.modules.values()}) == [12]
    out = save_lora(mixed, tmp_path / ("mixed.safetensors" if export_format == "kohya" else "mixed"), export_format)

    pipeline = build_random_pipeline("tiny")
    with Captured() as captured:
        pipeline.load_lora_weights(str(out.parent if export_format == "diffusers" else out), adapter_name="m")
    assert captured.messages == []
    loaded = {n.rsplit(".lora_A", 1)[0] for n, _ in pipeline.unet.named_parameters() if ".lora_A." in n}
    loaded_text = {n.rsplit(".lora_A", 1)[0] for n, _ in pipeline.text_encoder.named_parameters() if ".lora_A." in n}
    assert len(loaded) + len(loaded_text) == len(mixed.modules)  # every exported module was consumed

    oracle = build_random_pipeline("tiny")
    oracle.load_lora_weights(str(a), adapter_name="a")
    oracle.load_lora_weights(str(b), adapter_name="b")
    oracle.set_adapters(["a", "b"], list(WEIGHTS))
    expected, base = unet_output(oracle), unet_output(build_random_pipeline("tiny"))
    assert (expected - base).abs().max() > 0.1, "the LoRAs change the output"
    torch.testing.assert_close(unet_output(pipeline), expected, rtol=0, atol=1e-5)

    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    fused, reference = pipeline.unet.state_dict(), build_random_pipeline("tiny").unet.state_dict()
    deltas_a, deltas_b = expected_unet_deltas(a, 16 / 4), expected_unet_deltas(b, 8 / 8)
    for key, value in reference.items():
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in deltas_a:
            target = value + WEIGHTS[0] * deltas_a[module] + WEIGHTS[1] * deltas_b[module]
            error = (fused[key] - target).norm() / (target - value).norm()
            assert error < 1e-5, key
        else:
            assert torch.equal(fused[key], value), f"{key} is not targeted but changed"


def random_module(shape, rank, alpha, seed):
    generator = torch.Generator().manual_seed(seed)
    out, rest = shape[0], shape[1:]
    up_shape = (out, rank, 1, 1) if len(shape) == 4 else (out, rank)
    return LoRAModule(torch.randn(rank, *rest, generator=generator), torch.randn(*up_shape, generator=generator), alpha)


def test_conv_modules_round_trip_through_kohya(tmp_path):
    conv = "unet.down_blocks.0.resnets.0.conv1"  # 3x3 conv
    proj = "unet.down_blocks.0.attentions.0.proj_in"  # 1x1 conv in SD 1.x
    pipeline = build_random_pipeline("tiny")
    shapes = {conv: pipeline.unet.down_blocks[0].resnets[0].conv1.weight.shape,
              proj: pipeline.unet.down_blocks[0].attentions[0].proj_in.weight.shape}  # fmt: skip
    lora = LoRA({name: random_module(tuple(shape), 3, 6.0, i) for i, (name, shape) in enumerate(shapes.items())})
    path = save_lora(lora, tmp_path / "conv.safetensors", "kohya")
    assert load_lora(path).modules.keys() == lora.modules.keys()
    base = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    pipeline.load_lora_weights(str(path))
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    for name, module in lora.modules.items():
        key = name[len("unet.") :] + ".weight"
        torch.testing.assert_close(pipeline.unet.state_dict()[key] - base[key], module.delta(), rtol=1e-5, atol=1e-6)


def test_mix_is_linear_and_handles_partial_modules():
    shared, only_b = "unet.a.to_q", "unet.b.to_k"
    lora_a = LoRA({shared: random_module((16, 8), 2, 4.0, 0)})
    lora_b = LoRA({shared: random_module((16, 8), 5, 1.0, 1), only_b: random_module((16, 8), 3, 3.0, 2)})
    mixed = mix([lora_a, lora_b], [2.0, -0.5])
    expected = 2.0 * lora_a.modules[shared].delta() - 0.5 * lora_b.modules[shared].delta()
    torch.testing.assert_close(mixed.modules[shared].delta(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        mixed.modules[only_b].delta(), -0.5 * lora_b.modules[only_b].delta(), rtol=1e-5, atol=1e-6
    )
    assert mixed.modules[shared].rank == 7 and mixed.modules[only_b].rank == 3
    half = scale(lora_b, 0.5)
    torch.testing.assert_close(half.modules[only_b].delta(), 0.5 * lora_b.modules[only_b].delta(), rtol=1e-5, atol=1e-6)
    assert scale(lora_b, 0.0).modules == {}


def test_half_precision_export_keeps_small_deltas(tmp_path):
    module = random_module((64, 32), 4, 4.0, 0)
    tiny = LoRA({"unet.x.to_q": LoRAModule(module.down * 1e-4, module.up * 1e-4, 4.0)})  # delta ~1e-8: fp16-unsafe
    for dtype in ("fp16", "bf16"):
        loaded = load_lora(save_lora(tiny, tmp_path / f"{dtype}.safetensors", "diffusers", dtype=dtype))
        reference = tiny.modules["unet.x.to_q"].delta()
        error = (loaded.modules["unet.x.to_q"].delta() - reference).norm() / reference.norm()
        assert error < 2e-2, dtype


def test_svd_exact_for_low_rank_and_reports_energy():
    lora = LoRA(
        {"unet.a.to_q": random_module((32, 24), 3, 6.0, 0), "unet.b.conv1": random_module((16, 8, 3, 3), 2, 2.0, 1)}
    )
    exact, report = svd_rerank(lora, 3)
    for name, module in lora.modules.items():
        reference = module.delta()
        assert (exact.modules[name].delta() - reference).norm() / reference.norm() < 1e-5
        assert report.per_module[name] == pytest.approx(1.0, abs=1e-6)
    lossy, report = svd_rerank(lora, 1)
    assert 0 < report.overall < 1 and all(0 < v < 1 for v in report.per_module.values())
    reference = lora.modules["unet.a.to_q"].delta()
    residual = (lossy.modules["unet.a.to_q"].delta() - reference).norm() ** 2 / reference.norm() ** 2
    assert residual.item() == pytest.approx(1 - report.per_module["unet.a.to_q"], abs=1e-4)


@pytest.mark.parametrize(
    ("key", "kind"),
    [("lora_unet_x.lora_mid.weight", "lora_mid"), ("lora_unet_x.hada_w1_a", "LoHa"), ("lora_unet_x.lokr_w1", "LoKr"),
     ("lora_unet_x.dora_scale", "DoRA")],
)  # fmt: skip
def test_refuses_adapters_that_are_not_plain_lora(tmp_path, key, kind):
    save_file({key: torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match=f"is a .*{kind}.* not a plain LoRA"):
        load_lora(tmp_path / "x.safetensors")


def test_refuses_mismatched_base_models():
    a = LoRA({"unet.a.to_q": random_module((16, 8), 2, 2.0, 0)})
    b = LoRA({"unet.a.to_q": random_module((32, 8), 2, 2.0, 1)})
    with pytest.raises(ValueError, match=r"module unet\.a\.to_q has weight shape \(16, 8\) in LoRA #1 and \(32, 8\)"):
        mix([a, b], [1, 1])
    sd, sdxl = LoRA({}, base_model="sd_v1", source="a.safetensors"), LoRA({}, base_model="sdxl_base_v1-0")
    with pytest.raises(ValueError, match=r"different base models: a\.safetensors \(sd_v1\) and LoRA #2 \(sdxl_base"):
        mix([sd, sdxl], [1, 1])


def test_corrupt_and_unknown_files(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_lora(tmp_path / "bad.safetensors")
    save_file({"lora_unet_not_a_module.lora_down.weight": torch.zeros(1, 2)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(ValueError, match=r"'lora_unet_not_a_module' is not an SD 1\.x/2\.x module name"):
        load_lora(tmp_path / "k.safetensors")
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_lora(tmp_path / "missing.safetensors")


def test_export_is_atomic(tmp_path, monkeypatch):
    lora = LoRA({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": random_module((32, 32), 2, 2.0, 0)})
    target = save_lora(lora, tmp_path / "out.safetensors", "kohya")
    before = target.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("compose.formats.kohya.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_lora(scale(lora, 2.0), target, "kohya")
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_kohya_metadata(tmp_path, sources):
    mixed = mix([load_lora(sources[0]), load_lora(sources[1])], WEIGHTS)
    path = save_lora(
        mixed, tmp_path / "m.safetensors", "kohya", recipe={"inputs": ["a", "b"], "weights": list(WEIGHTS)}
    )
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}  # noqa: SIM118
    assert header["ss_network_module"] == "networks.lora" and header["ss_network_dim"] == "12"
    # The tiny pipeline's geometry is no real base model's: the file claims none (the real geometries' labels are
    # tested in test_inputs.py and test_transformers.py).
    assert "ss_base_model_version" not in header and "modelspec.architecture" not in header
    assert json.loads(header["draft.merge_recipe"])["weights"] == list(WEIGHTS)
    assert alphas == {12.0}


def test_cli_mix_scale_inspect(sources, tmp_path, capsys):
    from compose.__main__ import main

    a, b = sources
    out = tmp_path / "mixed.safetensors"
    assert main(["mix", f"{a}=0.7", f"{b}=-0.3", "-o", str(out)]) == 0
    expected = mix([load_lora(a), load_lora(b)], WEIGHTS)
    loaded = load_lora(out)
    for name, module in expected.modules.items():
        torch.testing.assert_close(loaded.modules[name].delta(), module.delta(), rtol=1e-5, atol=1e-7)

    assert main(["mix", f"{a}=1", "-o", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["scale", str(out), "--by", "0.5", "-o", str(out)]) == 2
    assert "is one of the inputs; pass --overwrite" in capsys.readouterr().err

    half = tmp_path / "half"
    assert main(["scale", str(out), "--by", "0.5", "-o", str(half), "--format", "diffusers", "--rank", "4"]) == 0
    assert "of the energy kept overall" in capsys.readouterr().err
    info_code = main(["inspect", str(half / "pytorch_lora_weights.safetensors")])
    info = json.loads(capsys.readouterr().out)
    assert info_code == 0 and info["format"] == "diffusers" and info["ranks"] == [4]
    assert json.loads(info["metadata"]["draft.merge_recipe"])["svd_rank"] == 4


def test_reads_a_peft_adapter_directory(tmp_path):
    from peft import get_peft_model

    unet = build_random_pipeline("tiny").unet
    torch.manual_seed(3)
    config = LoraConfig(
        r=2, lora_alpha=6, init_lora_weights=False, target_modules=["to_q"], alpha_pattern={"attn2.to_q": 1}
    )
    model = get_peft_model(unet, config)
    model.save_pretrained(tmp_path / "adapter")
    lora = load_lora(tmp_path / "adapter")
    layers = {n: m for n, m in model.base_model.model.named_modules() if n.endswith("to_q")}
    assert set(lora.modules) == {f"unet.{n}" for n in layers}
    for name, layer in layers.items():
        torch.testing.assert_close(
            lora.modules[f"unet.{name}"].delta(), layer.get_delta_weight("default"), rtol=1e-5, atol=1e-7
        )
    assert {m.alpha for m in lora.modules.values()} == {6.0, 1.0}


def test_partial_text_attention_is_completed_for_automatic1111(tmp_path):
    stem = "text_encoder.text_model.encoder.layers.0.self_attn"
    lora = LoRA(
        {f"{stem}.q_proj": random_module((32, 32), 2, 2.0, 0), f"{stem}.v_proj": random_module((32, 32), 2, 2.0, 1)}
    )
    loaded = load_lora(save_lora(lora, tmp_path / "te.safetensors", "kohya"))
    assert set(loaded.modules) == {f"{stem}.{p}_proj" for p in ("q", "k", "v", "out")}
    assert loaded.modules[f"{stem}.k_proj"].delta().abs().max() == 0
    torch.testing.assert_close(loaded.modules[f"{stem}.v_proj"].delta(), lora.modules[f"{stem}.v_proj"].delta())


def test_fuse_into_a_full_pipeline(sources, tmp_path):
    from compose.__main__ import main

    base = tmp_path / "base"
    build_random_pipeline("tiny").save_pretrained(base)
    lora_file = save_lora(load_lora(sources[0]), tmp_path / "a.safetensors", "kohya")
    assert main(["fuse", str(lora_file), "--base", str(base), "--by", "0.5", "-o", str(tmp_path / "fused")]) == 0
    fused = StableDiffusionPipeline.from_pretrained(str(tmp_path / "fused"))
    reference = StableDiffusionPipeline.from_pretrained(str(base))
    reference.load_lora_weights(str(lora_file), adapter_name="a")
    reference.set_adapters(["a"], [0.5])
    torch.testing.assert_close(unet_output(fused), unet_output(reference), rtol=0, atol=1e-5)
    assert main(["fuse", str(lora_file), "--base", str(base), "-o", str(tmp_path / "fused")]) == 2  # exists


def test_diffusers_file_without_metadata_means_alpha_equals_rank(tmp_path):
    module = random_module((16, 8), 3, 3.0, 0)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {f"{name}.lora_A.weight": module.down, f"{name}.lora_B.weight": module.up}, str(tmp_path / "plain.safetensors")
    )
    loaded = load_lora(tmp_path / "plain.safetensors")
    assert loaded.modules[name].alpha == 3.0 and loaded.modules[name].scale == 1.0


def test_kohya_reads_unet_names_beyond_sd15(tmp_path):
    """A diffusers UNet of another geometry (the embedded world's has attention in up_blocks.0) round-trips."""
    from compose.formats.kohya import diffusers_unet_name

    names = ["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0", "unet.mid_block.resnets.1.conv1"]
    lora = LoRA({n: LoRAModule(torch.randn(2, 8), torch.randn(8, 2), 2.0) for n in names})
    save_lora(lora, tmp_path / "x.safetensors", format="kohya")
    back = load_lora(tmp_path / "x.safetensors")
    assert set(back.modules) == set(names)
    for name in names:
        assert torch.allclose(back.modules[name].delta(), lora.modules[name].delta(), atol=1e-6)
    assert diffusers_unet_name("lora_unet_up_blocks_0_frobnicate") is None


def test_atomic_write_directory_keeps_the_old_directory_on_failure(tmp_path):
    from compose.files import atomic_write_directory

    target = tmp_path / "pipeline"
    atomic_write_directory(target, lambda d: (d / "a.txt").write_text("old"))

    def fail(directory):
        (directory / "a.txt").write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        atomic_write_directory(target, fail)
    assert (target / "a.txt").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["pipeline"]
    atomic_write_directory(target, lambda d: (d / "b.txt").write_text("new"))
    assert [p.name for p in target.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == [
        "pipeline"
    ]
