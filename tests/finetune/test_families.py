"""Every model family on tiny random pipelines in diffusers' own classes: the sampler is the pipeline's own, every
method trains from the CLI, gradients are cut where each method says, and the LoRA loads with the family's
``load_lora_weights``."""

import json
import subprocess
import sys

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from finetune.__main__ import main
from finetune.config import TrainConfig
from finetune.families import FAMILIES, family_for
from finetune.methods import METHODS, BatchRandom, MethodSettings
from finetune.pipelines import build_random_pipeline, load_pipeline
from finetune.profiling import component_flops, lower_bound_flops, step_work
from finetune.sampling import Sampler, generate
from finetune.trainer import Trainer
from rewards import get_reward
from tests.finetune.test_methods import SavedBytes

VARIANTS = {
    "sd": ("sd", "tiny"),
    "sdxl": ("sdxl", "tiny"),
    "sd3": ("sd3", "tiny"),
    "flux": ("flux", "tiny"),
    "flux-schnell": ("flux", "tiny-schnell"),
}
"""Test pipelines by name: (family, size)."""
GUIDANCE = 3.0
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """Each variant's tiny pipeline, saved with save_pretrained (built on first use)."""
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(variant):
        if variant not in built:
            family, size = VARIANTS[variant]
            built[variant] = root / variant
            build_random_pipeline(size, seed=0, family=family).save_pretrained(built[variant])
        return built[variant]

    return get


def config_for(tmp_path, **changes):
    values = dict(
        resolution=64,
        num_inference_steps=3,
        guidance_scale=GUIDANCE,
        batch_size=2,
        steps=1,
        lr=3e-2,
        weight_decay=0.0,
        eval_seeds=(0,),
        output_dir=str(tmp_path / "run"),
    )
    return TrainConfig(**{**values, **changes})


def trainer_for(family_dirs, variant, tmp_path, **changes):
    """A trainer on the variant's tiny pipeline, LoRA factors moved off zero so every factor gets a gradient."""
    trainer = Trainer(load_pipeline(family_dirs(variant)), get_reward("contrast"), config_for(tmp_path, **changes))
    with torch.no_grad():
        for p in trainer.named_params.values():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return trainer


@pytest.mark.parametrize("variant", VARIANTS)
def test_sampler_reproduces_the_pipeline(family_dirs, variant):
    """No LoRA: the project's sampler gives the diffusers pipeline's own images for the same prompts, initial
    noise, steps, guidance and resolution."""
    pipeline = load_pipeline(family_dirs(variant))
    family = family_for(pipeline)
    sampler = Sampler(family, 64, num_inference_steps=4, guidance_scale=GUIDANCE, checkpoint_unet=False)
    ours = generate(sampler, PROMPTS, seeds=[7], batch_size=2)
    noise = torch.randn((1, *sampler.latent_shape), generator=torch.Generator().manual_seed(7)).repeat(2, 1, 1, 1)
    latents = family.initial_latents(noise, sampler.solver)
    options = {"max_sequence_length": family.max_sequence_length} if variant.startswith("flux") else {}
    theirs = pipeline(
        PROMPTS,
        num_inference_steps=4,
        guidance_scale=GUIDANCE,
        height=64,
        width=64,
        latents=latents,
        output_type="pt",
        **options,
    ).images
    assert ours.shape == theirs.shape == (2, 3, 64, 64)
    assert (ours - theirs).abs().max().item() <= 1e-4
    assert ours.std() > 0.01 and (ours[0] - ours[1]).abs().max() > 1e-3, "a degenerate image would prove nothing"


def test_flux_guidance_goes_to_the_embedding_and_schnell_has_none(family_dirs):
    dev = family_for(load_pipeline(family_dirs("flux")))
    schnell = family_for(load_pipeline(family_dirs("flux-schnell")))
    assert dev.guidance_embeds and not schnell.guidance_embeds
    for family in (dev, schnell):
        assert family.encode(["a cat"], GUIDANCE, 64).uncond is None, "FLUX never runs a second guidance pass"
    seen = []
    hook = dev.denoiser.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["guidance"]), with_kwargs=True)
    Sampler(dev, 64, 1, guidance_scale=4.5).denoise(
        torch.randn(1, 16, 16 * 4), dev.encode(["a cat"], 4.5, 64), 0, 1, grad=False
    )
    hook.remove()
    assert seen[0].tolist() == [4.5]


def test_flow_schedules_are_the_pipelines(family_dirs):
    """SD3: the scheduler's shift 3; FLUX.1-dev: the dynamic shift mu of the packed token count; schnell: none."""
    sd3 = Sampler(family_for(load_pipeline(family_dirs("sd3"))), 64, 4).solver.sigmas
    smallest = 3 * 1e-3 / (1 + 2 * 1e-3)  # the scheduler's shifted sigma of training timestep 1
    base = torch.linspace(1.0, smallest, 4, dtype=torch.float64)
    torch.testing.assert_close(sd3, torch.cat([3 * base / (1 + 2 * base), torch.zeros(1, dtype=torch.float64)]).float())
    shifted = torch.tensor([1.0, 0.75, 0.5, 0.25])
    dev = Sampler(family_for(load_pipeline(family_dirs("flux"))), 64, 4).solver.sigmas
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # 64 px: 8x8 latents, 16 packed tokens
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / shifted - 1))
    torch.testing.assert_close(dev, torch.cat([expected, torch.zeros(1)]))
    schnell = Sampler(family_for(load_pipeline(family_dirs("flux-schnell"))), 64, 4).solver.sigmas
    torch.testing.assert_close(schnell, torch.cat([shifted, torch.zeros(1)]))


def lora_gradient(trainer, method, settings, seed=0):
    trainer.optimizer.zero_grad(set_to_none=True)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *trainer.latent_shape), generator=generator)
    generated = METHODS[method](
        trainer.sampler, trainer._conditioning(PROMPTS[:1]), noise, settings, BatchRandom(generator, 1)
    )
    (-trainer.reward(trainer.sampler.decode(generated.latents)).mean()).backward()
    return {name: p.grad.clone() for name, p in trainer.named_params.items() if p.grad is not None}


def reference_gradient(trainer, cut, seed=0):
    """The gradient of a hand-written sampling loop that keeps the graph everywhere except that the latents are
    detached before schedule position ``cut``."""
    trainer.optimizer.zero_grad(set_to_none=True)
    sampler, family = trainer.sampler, trainer.family
    noise = torch.randn((1, *trainer.latent_shape), generator=torch.Generator().manual_seed(seed))
    conditioning = trainer._conditioning(PROMPTS[:1])
    latents = family.initial_latents(noise, sampler.solver)
    for index, t in enumerate(sampler.timesteps):
        if index == cut:
            latents = latents.detach()
        output = family.guided(family.denoiser, latents, t, conditioning, sampler.guidance_scale)
        latents = sampler.solver.step(output, index, latents)[0]
    (-trainer.reward(sampler.decode(latents)).mean()).backward()
    return {name: p.grad.clone() for name, p in trainer.named_params.items() if p.grad is not None}


def distance(a, b):
    return sum((a[k] - b[k]).norm() ** 2 for k in a) ** 0.5 / sum(v.norm() ** 2 for v in b.values()) ** 0.5


@pytest.mark.parametrize("variant", ["sd", "sdxl", "sd3", "flux"])
def test_draft_k_cuts_the_gradient_at_step_t_minus_k(family_dirs, tmp_path, variant):
    """DRaFT-K's gradient is that of a loop detached exactly before step T - K (and not one step off); DRaFT and
    DRaFT-K with K = T are the loop with no detach."""
    trainer = trainer_for(family_dirs, variant, tmp_path)
    total = trainer.config.num_inference_steps
    full = reference_gradient(trainer, cut=None)
    assert len(full) == len(trainer.named_params)
    assert distance(lora_gradient(trainer, "draft", MethodSettings()), full) < 1e-4  # DRaFT = DRaFT-K with K = T
    references = {k: reference_gradient(trainer, cut=total - k) for k in (1, 2)}
    for k in (1, 2):
        assert distance(lora_gradient(trainer, "draft-k", MethodSettings(k=k)), references[k]) < 1e-4
    assert distance(references[1], references[2]) > 1e-3, "the cut position must matter"
    assert distance(references[2], full) > 1e-3


@pytest.mark.parametrize("variant", ["sd", "sdxl", "sd3", "flux"])
def test_draft_lv_renoises_to_the_last_steps_level(family_dirs, tmp_path, variant, monkeypatch):
    trainer = trainer_for(family_dirs, variant, tmp_path)
    sampler, solver = trainer.sampler, trainer.sampler.solver
    calls, inputs = [], []
    renoise = sampler.renoise

    def spy_renoise(x0, noise, index):
        calls.append((x0, noise, index))
        return renoise(x0, noise, index)

    monkeypatch.setattr(sampler, "renoise", spy_renoise)
    guided = trainer.family.guided
    monkeypatch.setattr(
        trainer.family,
        "guided",
        lambda d, latents, t, *rest: (
            inputs.append((latents, t, torch.is_grad_enabled())) or guided(d, latents, t, *rest)
        ),
    )
    noise = torch.randn((2, *trainer.latent_shape))
    generated = METHODS["draft-lv"](
        sampler, trainer._conditioning(PROMPTS), noise, MethodSettings(lv_n=2), BatchRandom(torch.Generator(), 2)
    )
    ((x0, fresh, index),) = calls
    total = len(sampler.timesteps)
    assert index == total - 1 and x0.shape[0] == 4 and generated.latents.shape[0] == 4
    if isinstance(solver.scheduler, DDIMScheduler):
        alpha = solver.scheduler.alphas_cumprod[int(sampler.timesteps[-1])]
        expected = alpha.sqrt() * x0 + (1 - alpha).sqrt() * fresh
    else:
        sigma = solver.sigmas[total - 1]
        expected = (1 - sigma) * x0 + sigma * fresh
    grad_inputs = [(latents, t) for latents, t, grad in inputs if grad]
    assert len(grad_inputs) == 1 and grad_inputs[0][1] == sampler.timesteps[-1]
    torch.testing.assert_close(grad_inputs[0][0], expected)


@pytest.mark.parametrize("variant", ["sd", "sdxl", "sd3", "flux"])
def test_refl_returns_the_schedulers_x0(family_dirs, tmp_path, variant, monkeypatch):
    trainer = trainer_for(family_dirs, variant, tmp_path)
    sampler = trainer.sampler
    seen = []
    guided = trainer.family.guided

    def spy(denoiser, latents, t, *rest):
        output = guided(denoiser, latents, t, *rest)
        if torch.is_grad_enabled():
            seen.append((latents.detach(), t, output.detach()))
        return output

    monkeypatch.setattr(trainer.family, "guided", spy)
    settings = MethodSettings(refl_range=(0.5, 0.5))  # stop at position 2 of 3: sigma / alpha not trivial
    noise = torch.randn((2, *trainer.latent_shape))
    generated = METHODS["refl"](
        sampler, trainer._conditioning(PROMPTS), noise, settings, BatchRandom(torch.Generator(), 2)
    )
    ((latents, t, output),) = seen
    index = sampler.timesteps.tolist().index(t.item())
    assert index == 2
    if isinstance(sampler.solver.scheduler, DDIMScheduler):
        scheduler = DDIMScheduler.from_config(trainer.pipeline.scheduler.config)
        scheduler.set_timesteps(3)
        expected = scheduler.step(output, t, latents).pred_original_sample
    else:
        expected = latents - sampler.solver.sigmas[index] * output
    assert generated.latents.requires_grad
    torch.testing.assert_close(generated.latents.detach(), expected)


@pytest.mark.parametrize("variant", ["sdxl", "sd3", "flux"])
def test_only_lora_changes_and_the_saved_lora_loads_exactly(family_dirs, tmp_path, variant):
    trainer = trainer_for(family_dirs, variant, tmp_path)
    family = trainer.family
    targets = {name.split(".lora_")[0].split(".", 1)[1] for name in trainer.named_params}
    leaves = {name.rsplit(".", 1)[-1] if not name.endswith("to_out.0") else "to_out.0" for name in targets}
    assert leaves == set(family.lora_targets)
    if variant == "flux":
        assert any(name.startswith("single_transformer_blocks.") for name in targets)
    trainer.train_step()
    reference = load_pipeline(family_dirs(variant))
    for name, module in reference.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        trained = getattr(trainer.pipeline, name).state_dict()
        for key, value in module.state_dict().items():
            stem, _, leaf = key.rpartition(".")
            trained_key = key if key in trained else f"{stem}.base_layer.{leaf}"
            torch.testing.assert_close(trained[trained_key], value, rtol=0, atol=0)
    loaded = load_pipeline(family_dirs(variant))
    loaded.load_lora_weights(trainer.save_lora(tmp_path / "lora").parent)
    images = [
        generate(Sampler(family_for(p), 64, 2, GUIDANCE, checkpoint_unet=False), ["a cat"], [0], batch_size=1)
        for p in (trainer.pipeline, loaded, reference)
    ]
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)  # the saved LoRA is the trained one
    assert (images[0] - images[2]).abs().max() > 1e-4


@pytest.mark.parametrize(
    ("variant", "method"), [("sdxl", "draft-k"), ("sd3", "draft-lv"), ("flux", "refl"), ("flux-schnell", "draft")]
)
def test_cli_trains_each_family(family_dirs, tmp_path, variant, method, capsys):
    """A short CLI run writes every artefact; its LoRA loads with the family's load_lora_weights and changes the
    pipeline's output. (Each method runs on every family in the gradient tests above; here each family and each
    method go through the CLI once, to keep the suite short.)"""
    (tmp_path / "eval.txt").write_text("a photo of a dog\n")
    out = tmp_path / "run"
    code = main(
        [
            "train", "--model", str(family_dirs(variant)), "--reward", "contrast", "--method", method,
            "--k", "2", "--steps", "1", "--batch-size", "1", "--resolution", "64", "--num-inference-steps", "2",
            "--guidance-scale", str(GUIDANCE), "--lr", "0.05", "--output-dir", str(out),
            "--eval-prompts", str(tmp_path / "eval.txt"), "--eval-every", "1", "--checkpoint-every", "1",
            *(["--lora-targets", "to_q", "to_v"] if variant == "flux-schnell" else []),
        ]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1] and "eval_reward" in lines[-1] and "loss" in lines[-1]
    assert (out / "training_config.yaml").exists() and (out / "samples" / "step_000001.png").exists()
    assert (out / "checkpoints" / "step_000001").exists() and list((out / "tensorboard").iterdir())
    saved = load_file(str(out / "pytorch_lora_weights.safetensors"))
    default = {target.rsplit(".", 1)[-1] for target in FAMILIES[VARIANTS[variant][0]].lora_targets}
    expected = {"to_q", "to_v"} if variant == "flux-schnell" else default  # --lora-targets on schnell's run
    assert {key.split(".lora")[0].rsplit(".", 1)[-1] for key in saved} == expected

    base = load_pipeline(family_dirs(variant))
    tuned = load_pipeline(family_dirs(variant))
    tuned.load_lora_weights(out)
    images = []
    for pipeline in (base, tuned):
        sampler = Sampler(family_for(pipeline), 64, 2, GUIDANCE, checkpoint_unet=False)
        images.append(generate(sampler, ["a photo of a dog"], [0], batch_size=1))
    assert (images[0] - images[1]).abs().max() > 1e-4, "the loaded LoRA changes the output"


def test_unsupported_pipelines_are_named(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ValueError, match=r"PixArtAlphaPipeline is not a supported pipeline; supported: "):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match=r"FluxPipeline \(FLUX.1 \(dev, schnell\)\)"):
        family_for(torch.nn.Module())
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "flux"}


REAL_GEOMETRIES = {
    # (family, size): (denoiser parameters counted here, the published figure, its source)
    ("sdxl", "base"): (2_567_463_684, 2.6e9, "SDXL paper (Podell et al., 2023), Table 1: UNet 2.6B"),
    ("sd3", "3.5-large"): (8_056_627_520, 8.1e9, "Stability AI, SD3.5 Large model card: 8.1 billion parameters"),
    ("flux", "dev"): (11_901_408_320, 12e9, "Black Forest Labs, FLUX.1 [dev] model card: 12 billion parameters"),
    # Stability AI announces SD3.5 Medium with "2.5 billion parameters"; the MMDiT-X built from the published
    # transformer configuration (24 blocks, 24 heads, dual attention in blocks 0-12) has 2.24B, 10% fewer.
    ("sd3", "3.5-medium"): (2_243_171_520, 2.5e9, "Stability AI, SD3.5 announcement: 2.5 billion parameters"),
}


@pytest.mark.parametrize(("family", "size"), REAL_GEOMETRIES)
def test_real_geometries_on_the_meta_device(family, size):
    """Parameter counts of the real denoisers against the published figures, and the FLOP floor of a DRaFT-1 step
    at the family's native resolution (batch 1) from the components' counted FLOPs."""
    counted, published, _ = REAL_GEOMETRIES[(family, size)]
    with torch.device("meta"):
        pipeline = build_random_pipeline(size, family=family)
        reward = get_reward("aesthetic", pretrained=False)
        resolved = family_for(pipeline)
        parameters = sum(p.numel() for p in resolved.denoiser.parameters())
        components = component_flops(pipeline, reward, resolved.defaults.resolution)
    assert parameters == counted
    assert parameters == pytest.approx(published, rel=0.12 if size == "3.5-medium" else 0.02)
    if family != "sdxl":  # a transformer applies most weights once per image token: 2 FLOPs per weight and token
        tokens = (resolved.defaults.resolution // 16) ** 2  # (its adaLN modulation weights act once per image)
        assert 0.4 < components["denoiser"] / (2 * parameters * tokens) < 1.5
    config = TrainConfig(method="draft-k", k=1, batch_size=1).with_defaults(resolved.defaults)
    floor = lower_bound_flops(step_work(config, resolved.guidance_passes(config.guidance_scale)), components)
    passes = 1 if family == "flux" else 2
    assert floor > config.num_inference_steps * passes * components["denoiser"]


def test_family_defaults_are_filled_in_and_recorded(family_dirs, tmp_path):
    trainer = Trainer(
        load_pipeline(family_dirs("flux")), get_reward("contrast"), TrainConfig(output_dir=str(tmp_path / "run"))
    )
    config = trainer.config
    assert (config.resolution, config.num_inference_steps, config.guidance_scale) == (1024, 28, 3.5)
    assert trainer.latent_shape == (16, 128, 128)
    schnell = family_for(load_pipeline(family_dirs("flux-schnell"))).defaults
    assert (schnell.num_inference_steps, schnell.guidance_scale) == (4, 0.0)
    config.save(tmp_path / "training_config.yaml")
    assert TrainConfig.load(tmp_path / "training_config.yaml").guidance_scale == 3.5
    with pytest.raises(ValueError, match="flow-matching sampling is deterministic Euler; set eta to 0"):
        Trainer(load_pipeline(family_dirs("sd3")), get_reward("contrast"), config_for(tmp_path, eta=0.5))
    with pytest.raises(ValueError, match=r"resolution 72 is not divisible by 16"):
        Trainer(load_pipeline(family_dirs("flux")), get_reward("contrast"), config_for(tmp_path, resolution=72))


def test_offloaded_text_encoders_run_on_the_denoisers_device(family_dirs, tmp_path):
    """Each encoding sees every text encoder on the trainer's device and leaves them on the CPU (on a CPU-only
    machine both are the CPU: this checks the path, the GPU memory saving needs a GPU)."""
    config = config_for(tmp_path, offload_text_encoders=True, num_inference_steps=2, batch_size=1)
    trainer = Trainer(load_pipeline(family_dirs("sd3")), get_reward("contrast"), config)
    encoders = trainer.family.text_encoders()
    seen = []
    for encoder in encoders:
        encoder.register_forward_pre_hook(lambda module, args: seen.append(next(module.parameters()).device))
    assert torch.isfinite(torch.tensor(trainer.train_step()["loss"]))
    assert len(encoders) == 3 and len(seen) >= 3 and set(seen) == {trainer.device}
    assert all(next(encoder.parameters()).device.type == "cpu" for encoder in encoders)
    with pytest.raises(ValueError, match="cannot train one"):
        config.replace(train_text_encoder=True)


def test_flow_family_resume_is_bitwise_identical(family_dirs, tmp_path):
    config = config_for(
        tmp_path, method="draft-lv", num_inference_steps=2, batch_size=1, checkpoint_every=2, eval_seeds=(0, 1)
    )
    runs = {}
    for name, steps, resume in (("straight", 4, False), ("interrupted", 2, False), ("interrupted", 4, True)):
        trainer = Trainer(
            load_pipeline(family_dirs("flux")),
            get_reward("contrast"),
            config.replace(steps=steps, resume=resume, output_dir=str(tmp_path / name)),
            eval_prompts=["a cat"],
        )
        trainer.train()
        runs[name] = trainer
    assert runs["interrupted"].step == 4
    for name, p in runs["straight"].named_params.items():
        assert torch.equal(p, runs["interrupted"].named_params[name]), name
    assert any(p.abs().max() > 0 for name, p in runs["straight"].named_params.items() if "lora_B" in name)


@pytest.mark.slow
def test_flow_family_two_processes_equal_one(family_dirs, tmp_path):
    """Data parallel on FLUX, with Flow-GRPO: two CPU processes (torchrun, gloo) with batch 1 and two accumulated
    micro-batches make one process's update with batch 2. Each group of 2 spans both processes (the round's order is
    micro-batch, then process), so its advantages need every rank's rewards; one PPO minibatch makes the gradient
    the round's mean. (DRaFT's data parallel, the same DDP-wrapped model, is tested on SD in test_distributed.py;
    one multi-process test here keeps the suite short.)"""
    (tmp_path / "eval.txt").write_text("a photo of a dog\n")
    loras = []
    for processes, batch in ((1, 2), (2, 1)):
        out = tmp_path / f"run-{processes}"
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        command = [
            sys.executable, *(launcher if processes > 1 else []), "-m", "finetune", "train",
            "--model", str(family_dirs("flux")), "--reward", "contrast", "--method", "grpo", "--grpo-group-size", "2",
            "--ddpo-minibatches", "1", "--steps", "2", "--batch-size", str(batch), "--grad-accum", "2",
            "--resolution", "64", "--num-inference-steps", "2", "--lr", "0.01",
            "--output-dir", str(out), "--device", "cpu", "--eval-every", "100",
            "--eval-prompts", str(tmp_path / "eval.txt"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        loras.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    single, double = loras
    assert single.keys() == double.keys() and single
    assert max(v.abs().max().item() for k, v in single.items() if "lora_B" in k or "lora.up" in k) > 1e-3
    # AdamW moves each weight by about lr x g / (|g| + eps): the down factors' gradients are exactly 0 in step 1 (the
    # up factors start at 0) and tiny in step 2, so float rounding in the all-reduce can move a rare entry by a
    # fraction of lr (0.01; 3e-5 seen). A wrong update (e.g. advantages from one rank's rewards) differs everywhere.
    close = total = 0
    for key, value in single.items():
        difference = (double[key] - value).abs()
        assert difference.max().item() < 1e-3, key
        close += int((difference <= 1e-5).sum())
        total += value.numel()
    assert close >= 0.99 * total, f"{total - close} of {total} LoRA entries differ by more than 1e-5"


def test_text_encoder_lora_of_a_transformer_family_loads_exactly(family_dirs, tmp_path):
    trainer = trainer_for(family_dirs, "flux", tmp_path, train_text_encoder=True)
    assert any(name.startswith("text_encoder.") for name in trainer.named_params)
    trainer.train_step()
    loaded = load_pipeline(family_dirs("flux"))
    loaded.load_lora_weights(trainer.save_lora(tmp_path / "lora").parent)
    images = [
        generate(Sampler(family_for(p), 64, 2, GUIDANCE, checkpoint_unet=False), ["a cat"], [0], batch_size=1)
        for p in (trainer.pipeline, loaded)
    ]
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("variant", ["sd3", "flux"])
def test_saved_activations_flat_in_k_on_flow_families(family_dirs, tmp_path, variant, checkpointing):
    """With the denoiser checkpointed per step, what autograd keeps for backward barely grows from K = 1 to K = T
    (without checkpointing it grows with K)."""
    trainer = trainer_for(
        family_dirs, variant, tmp_path, num_inference_steps=4, batch_size=1, gradient_checkpointing=checkpointing
    )
    saved = {}
    for k in (1, 4):
        counter = SavedBytes()
        with counter:
            noise = torch.randn((1, *trainer.latent_shape))
            rng = BatchRandom(torch.Generator(), 1)
            conditioning = trainer._conditioning(["a cat"])
            generated = METHODS["draft-k"](trainer.sampler, conditioning, noise, MethodSettings(k=k), rng)
            trainer.reward(trainer.sampler.decode(generated.latents))
        saved[k] = counter.bytes
    assert saved[4] / saved[1] < 1.05 if checkpointing else saved[4] / saved[1] > 1.5  # measured: 1.003; 1.88-1.94
