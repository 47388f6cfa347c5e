"""Over-optimisation guards: judges (never trained on), diversity, early stopping with the best LoRA, anchoring."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

import finetune.pipelines
from finetune.__main__ import build_parser, main
from finetune.config import TrainConfig
from finetune.diversity import PIXELS, diversity, feature_space
from finetune.guards import EarlyStopping, EarlyStopSpec, build_judges, default_eval_rewards
from finetune.methods import BatchRandom
from finetune.pipelines import load_pipeline
from finetune.trainer import Trainer
from rewards import get_reward
from tests.browser import assert_renders
from tests.finetune.test_speed import trainer_for

EVAL_PROMPTS = ["a red fox in a snowy field", "a stone bridge over a mountain river"]
"""Two held-out prompts x two seeds keep each evaluation to four images."""


def judges():
    """Judges with weights: a tiny random CLIP aesthetic head (it has an image embedding) and the shapes size."""
    return {
        "aesthetic": get_reward("aesthetic", pretrained=False, tiny=True),
        "size": get_reward("shapes", objective="size"),
    }


# ------------------------------------------------------------------------------------------------------- judges
def test_judges_never_receive_gradients_nor_enter_the_loss(tiny_model_dir, tiny_config):
    """Training with judges gives bit for bit the LoRA and losses of training without; the judges run without
    grad on every call, keep no gradient and are not in the optimizer; their scores are logged at each evaluation."""
    config = tiny_config.replace(steps=2, eval_every=1, eval_seeds=(0, 1))
    plain = Trainer(load_pipeline(tiny_model_dir), get_reward("contrast"), config, eval_prompts=EVAL_PROMPTS)
    plain_history = plain.train()

    grad_modes = []
    with_judges = judges()
    for judge in with_judges.values():
        judge.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    judged = Trainer(
        load_pipeline(tiny_model_dir),
        get_reward("contrast"),
        config.replace(output_dir=str(tiny_config.output_dir) + "-judged"),
        eval_prompts=EVAL_PROMPTS,
        judges=with_judges,
    )
    judged_history = judged.train()

    for name, p in plain.named_params.items():
        assert torch.equal(p, judged.named_params[name]), name
    for a, b in zip(plain_history, judged_history, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert grad_modes and not any(grad_modes), "a judge ran with grad enabled"
    optimized = {id(p) for group in judged.optimizer.param_groups for p in group["params"]}
    for judge in with_judges.values():
        for p in judge.parameters():
            assert p.grad is None and not p.requires_grad and id(p) not in optimized
    lines = [json.loads(x) for x in (judged.output_dir / "metrics.jsonl").read_text().splitlines()]
    evaluations = [line for line in lines if "eval_reward" in line]
    assert [e["step"] for e in evaluations] == [0, 1, 2]
    assert all("judge/aesthetic" in e and "judge/size" in e for e in evaluations)
    assert 0 < evaluations[0]["judge/size"] < 1
    assert judged.guards.space.name.startswith("aesthetic image embedding")


def test_judges_from_config_and_defaults():
    built = build_judges(["brightness", "contrast=1,saturation=0.5"])
    assert list(built) == ["brightness", "contrast=1,saturation=0.5"]
    assert build_judges(["none"]) == {}
    assert default_eval_rewards("aesthetic", world=False) == ("hpsv2.1", "imagereward", "pickscore")
    assert default_eval_rewards("shapes", world=True) == ("shapes-judge-match", "shapes-geometry")
    with pytest.raises(ValueError, match="unknown reward 'aesthetik'"):
        build_judges(["aesthetik"])


def test_unavailable_default_judge_is_skipped_with_a_reason():
    """The test session is offline with empty caches: the pretrained aesthetic weights are not there."""
    with pytest.warns(UserWarning, match="judge 'aesthetic' skipped: unavailable .*MissingWeightsError"):
        assert build_judges(["aesthetic", "brightness"], skip_unavailable=True).keys() == {"brightness"}
    with pytest.raises(FileNotFoundError, match="aesthetic"):
        build_judges(["aesthetic"])


# ---------------------------------------------------------------------------------------------------- diversity
@pytest.mark.parametrize("space", ["pixels", "shapes"])
def test_diversity_is_zero_for_identical_images_and_grows_with_spread(space):
    space = PIXELS if space == "pixels" else feature_space([get_reward("shapes", objective="size")])
    generator = torch.Generator().manual_seed(0)
    base = torch.rand(3, 1, 3, 32, 32, generator=generator)  # 3 prompts, one picture each
    directions = torch.randn(3, 4, 3, 32, 32, generator=generator)  # 4 seeds
    values = []
    for spread in (0.0, 0.05, 0.15, 0.4):
        images = (base + spread * directions).clamp(0, 1).flatten(0, 1)
        values.append(diversity(images, seeds=4, space=space))
    assert values[0].shape == (3,)
    assert torch.all(values[0].abs() < 1e-6), values[0]
    means = [v.mean().item() for v in values]
    assert means == sorted(means) and means[1] > 0, means


def test_diversity_feature_space_choice_and_errors():
    assert feature_space([get_reward("brightness")]) is PIXELS
    mix = get_reward("brightness") + get_reward("shapes", objective="size")
    assert feature_space([mix]).name.startswith("shapes image embedding")
    with pytest.raises(ValueError, match="at least 2 images per prompt"):
        diversity(torch.rand(4, 3, 8, 8), seeds=1)


def test_diversity_collapse_warning(tiny_model_dir, tiny_config):
    trainer = Trainer(load_pipeline(tiny_model_dir), get_reward("contrast"), tiny_config.replace(eval_seeds=(0, 1)))
    assert trainer.guards.observe(0, {"diversity": 0.2}, trainer.named_params) is False
    with pytest.warns(UserWarning, match="step 5: held-out diversity 0.08 is 40% of the base model's"):
        metrics = {"diversity": 0.08}
        trainer.guards.observe(5, metrics, trainer.named_params)
    assert metrics["diversity_ratio"] == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------- early stopping
def test_early_stop_spec():
    spec = EarlyStopSpec.parse("judge=hpsv2.1,patience=2,drop=0.05")
    assert spec == EarlyStopSpec("hpsv2.1", 2, 0.05) and spec.metric_key() == "judge/hpsv2.1"
    assert EarlyStopSpec.parse("judge=reward").metric_key() == "eval_reward"
    for bad in ("hpsv2", "judge=x,patience=0", "judge=x,drop=-1", "judge=x,patience=two", "patience=2"):
        with pytest.raises(ValueError, match="--early-stop"):
            EarlyStopSpec.parse(bad)
    with pytest.raises(ValueError, match="not one of this run's eval rewards"):
        EarlyStopSpec.parse("judge=pickscore").check_available(["aesthetic"])


def test_early_stopping_follows_best_and_patience():
    tracker = EarlyStopping(EarlyStopSpec("a", patience=2, drop=0.1))
    params = {"w": torch.zeros(2)}
    stops = []
    for step, value in enumerate([1.0, 1.2, 1.15, 1.05, 1.3, 1.1, 1.0]):
        params["w"].fill_(step)
        stops.append(tracker.observe(step, {"judge/a": value}, params))
    # 1.15 is within the margin (resets the count); 1.05 is the first bad one; 1.3 is a new best; 1.1, 1.0 bad.
    assert stops == [False, False, False, False, False, False, True]
    assert tracker.best_step == 4 and torch.equal(tracker.best_state["w"], torch.full((2,), 4.0))


def test_early_stopping_restores_the_best_lora_bit_for_bit(tiny_model_dir, tiny_config):
    """A judge that falls as the training reward rises (negated contrast): the run stops after ``patience`` bad
    evaluations, and the final LoRA, in memory and on disk, is the one of the judge's best evaluation."""
    config = tiny_config.replace(
        steps=8, eval_every=1, eval_seeds=(0, 1), early_stop="judge=less contrast,patience=2,drop=0"
    )
    snapshots = {}

    def keep(trainer, metrics):
        snapshots[metrics["step"]] = {k: p.detach().clone() for k, p in trainer.named_params.items()}

    trainer = Trainer(
        load_pipeline(tiny_model_dir),
        get_reward("contrast"),
        config,
        eval_prompts=EVAL_PROMPTS,
        callbacks=[keep],
        judges={"less contrast": -1 * get_reward("contrast")},
    )
    snapshots[0] = {k: p.detach().clone() for k, p in trainer.named_params.items()}
    trainer.train()
    lines = [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
    final = lines[-1]
    assert final["early_stopped"] and final["early_stop_metric"] == "judge/less contrast"
    assert trainer.step < config.steps
    best = final["best_step"]
    evaluations = {line["step"]: line["judge/less contrast"] for line in lines if "judge/less contrast" in line}
    assert final["best_value"] == max(evaluations.values()) == evaluations[best]
    assert any(not torch.equal(p, snapshots[best][k]) for k, p in snapshots[trainer.step].items())
    for name, p in trainer.named_params.items():
        assert torch.equal(p, snapshots[best][name]), name
    # On disk: the saved LoRA's tensors are the restored ones (the same multiset of values, bit for bit).
    saved = load_file(trainer.output_dir / "pytorch_lora_weights.safetensors")
    on_disk = sorted(t.flatten().tolist() for t in saved.values())
    in_memory = sorted(p.flatten().tolist() for p in snapshots[best].values())
    assert on_disk == in_memory
    report = (trainer.output_dir / "report.html").read_text()
    assert f"the final LoRA is the best one, from step {best}" in report
    assert_renders(trainer.output_dir / "report.html", min_images=2 * len(trainer.eval_prompts) + 1)


def test_early_stopping_survives_resume(tiny_model_dir, tiny_config, tmp_path):
    """A run stopped at step 2 (mid-way through its patience, its best LoRA an earlier one) and resumed ends with the
    final LoRA, the early-stopping summary and the evaluations (diversity ratio included) of an uninterrupted run."""
    config = tiny_config.replace(
        steps=6, eval_every=1, checkpoint_every=2, eval_seeds=(0, 1), early_stop="judge=less contrast,patience=3"
    )

    def run(config):
        judges = {"less contrast": -1 * get_reward("contrast")}
        trainer = Trainer(
            load_pipeline(tiny_model_dir), get_reward("contrast"), config, eval_prompts=EVAL_PROMPTS, judges=judges
        )
        trainer.train()
        lines = [json.loads(x) for x in (trainer.output_dir / "metrics.jsonl").read_text().splitlines()]
        return trainer, [{k: v for k, v in line.items() if k != "sec_per_step"} for line in lines]

    straight, straight_lines = run(config.replace(output_dir=str(tmp_path / "straight")))
    first = config.replace(steps=2, output_dir=str(tmp_path / "resumed"))
    stopped, _ = run(first)
    assert stopped.guards.early_stopping.bad_evaluations > 0 and stopped.guards.early_stopping.best_step < 2
    resumed, resumed_lines = run(first.replace(steps=6, resume=True))

    summary = straight_lines[-1]
    assert summary["early_stopped"] and 2 < summary["step"] < 6
    assert resumed_lines[-1] == summary
    # The first part's closing record (it ran to step 2) is replaced by the resumed run's, not left mid-file.
    assert [line for line in resumed_lines if "early_stop_metric" in line] == [summary]
    for name, p in straight.named_params.items():
        assert torch.equal(p, resumed.named_params[name]), name
    evaluations = [line for line in straight_lines if "eval_reward" in line]
    assert evaluations[-1]["step"] > 2 and "diversity_ratio" in evaluations[-1]
    assert [line for line in resumed_lines if "eval_reward" in line] == evaluations


# ---------------------------------------------------------------------------------------------------- anchoring
def test_anchor_penalty_is_zero_at_step_zero(tiny_model_dir, tiny_config):
    trainer = Trainer(load_pipeline(tiny_model_dir), get_reward("contrast"), tiny_config.replace(anchor_weight=1.0))
    metrics = trainer.train_step()
    assert metrics["anchor"] == 0.0
    assert metrics["loss"] == pytest.approx(-metrics["reward"], abs=1e-7)
    assert trainer.train_step()["anchor"] > 0  # the first update moved the LoRA off the base model


@pytest.mark.parametrize("chunk", [None, 1])
def test_anchor_penalty_equals_an_independent_computation(tiny_model_dir, tiny_config, chunk):
    """With the LoRA off zero, the trainer's penalty over K = 2 grad steps equals the mean squared difference
    between the LoRA model's guided predictions and those of a separately loaded base pipeline."""
    config = tiny_config.replace(anchor_weight=0.5, k=2, grad_chunk_size=chunk)
    trainer = trainer_for(tiny_model_dir, config)
    prompts = ["a red fox", "a koala"]
    noise = torch.randn((2, *trainer.latent_shape), generator=torch.Generator().manual_seed(3))
    trainer.backward(prompts, noise, BatchRandom(torch.Generator().manual_seed(0), 2))
    penalty = trainer._anchor_penalties[-1]

    base_unet = load_pipeline(tiny_model_dir).unet
    sampler, family = trainer.sampler, trainer.family
    sampler.anchor = None
    with torch.no_grad():
        conditioning = sampler.encode(prompts)
        total = len(sampler.timesteps)
        latents = sampler.denoise(sampler.initial_latents(noise), conditioning, 0, total - 2, grad=False)
        terms = []
        for index in range(total - 2, total):
            t = sampler.timesteps[index]
            lora = family.guided(family.denoiser, latents, t, conditioning, sampler.guidance_scale)
            base = family.guided(base_unet, latents, t, conditioning, sampler.guidance_scale)
            terms.append((lora - base).pow(2).mean())
            latents, _ = sampler.solver.step(lora, index, latents, None)
    expected = torch.stack(terms).mean().item()
    assert expected > 1e-8
    assert penalty == pytest.approx(expected, rel=1e-5)


def test_anchor_gradient_pulls_toward_the_base_model(tiny_model_dir, tiny_config):
    """The penalty's gradient joins the reward's: with only the anchor (a reward of weight 0), a small Adam step
    (far smaller than the LoRA's distance from zero) lowers it on the same batch."""
    config = tiny_config.replace(anchor_weight=1.0, lr=1e-4, max_grad_norm=1e6)
    trainer = trainer_for(tiny_model_dir, config)
    trainer.reward = 0 * get_reward("contrast")
    first = trainer.train_step()["anchor"]
    trainer.generator.manual_seed(config.seed)  # the same prompts and noise again
    assert trainer.train_step()["anchor"] < first


def test_guard_settings_are_checked():
    with pytest.raises(ValueError, match="diversity_warn"):
        TrainConfig(diversity_warn=1.5)
    with pytest.raises(ValueError, match="anchor_weight"):
        TrainConfig(anchor_weight=-1)
    with pytest.raises(ValueError, match="ddpo has none"):
        TrainConfig(method="ddpo", anchor_weight=0.1)
    with pytest.raises(ValueError, match="--early-stop"):
        TrainConfig(early_stop="judge")


# ---------------------------------------------------------------------------------------------- command line
def test_cli_guards(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The guard flags reach the run; judge names and the early-stop metric are checked before loading."""
    out = tmp_path / "cli"
    args = ["train", "--model", str(tiny_model_dir), "--reward", "contrast", "--resolution", "64"]
    args += ["--num-inference-steps", "3", "--batch-size", "2", "--steps", "1", "--output-dir", str(out)]
    guards = ["--eval-rewards", "brightness", "--eval-seeds", "0", "1", "--anchor-weight", "0.1"]
    code = main([*args, *guards, "--early-stop", "judge=brightness,patience=1"])
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "training_config.yaml").read_text())
    assert saved["eval_rewards"] == ["brightness"] and saved["eval_seeds"] == [0, 1] and saved["anchor_weight"] == 0.1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "judge/brightness" in lines[0] and "diversity" in lines[0] and lines[1]["anchor"] == 0.0
    assert lines[-1]["early_stop_metric"] == "judge/brightness" and (out / "report.html").exists()
    assert "the final LoRA is the best one" in capsys.readouterr().out

    def trap(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(finetune.pipelines, "load_pipeline", trap)
    args[args.index(str(out))] = str(tmp_path / "x")
    code = main([*args, "--eval-rewards", "brightness", "--early-stop", "judge=pickscore"])
    assert code == 2 and "not one of this run's eval rewards" in capsys.readouterr().err
    code = main([*args, "--eval-rewards", "aesthetik"])
    assert code == 2 and "unknown reward 'aesthetik'" in capsys.readouterr().err


def test_cli_default_judges(tiny_model_dir):
    from finetune.__main__ import build_cli_judges, config_from_args

    world = config_from_args(build_parser().parse_args(["train", "--model", "world"]))
    assert list(build_cli_judges(world)) == ["shapes-judge-match", "shapes-geometry"]
    real = TrainConfig(model=str(tiny_model_dir), reward="aesthetic")
    with pytest.warns(UserWarning) as caught:  # offline, empty caches: no preference reward's weights are here
        assert build_cli_judges(real) == {}
    skipped = sorted(str(w.message).split("'")[1] for w in caught if "skipped: unavailable" in str(w.message))
    assert skipped == ["hpsv2.1", "imagereward", "pickscore"]
