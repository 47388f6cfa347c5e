"""The RL methods (``finetune.rl``): DDPO's and Flow-GRPO's transitions and log-probabilities against independent
computations, the PPO ratio before any update, the advantages, rewards without a gradient, the family checks and
resume."""

import math
import subprocess
import sys
import warnings

import pytest
import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file

from finetune.__main__ import check_reward_arguments
from finetune.config import DRAFT_METHOD_NAMES, TrainConfig
from finetune.pipelines import build_random_pipeline, load_pipeline
from finetune.rl.ddpo import PerPromptStatTracker
from finetune.rl.grpo import group_advantages, sde_transition
from finetune.rl.policy import CLIPPING_ROUNDS, ppo_loss
from finetune.trainer import Trainer
from rewards import get_reward
from tests.finetune.test_distributed import LAUNCHER

ETA = 1.0


def ddpo_config(tiny_config, **changes):
    return tiny_config.replace(method="ddpo", **changes)


def ddpo_trainer(model_dir, config, reward="contrast", scheduler_changes=None):
    pipeline = load_pipeline(model_dir)
    if scheduler_changes:
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, **scheduler_changes)
    return Trainer(
        pipeline, get_reward(reward), config, prompts=["a cat", "a red car", "a bowl of fruit"], eval_prompts=["a cat"]
    )


def normal_log_prob(sample, mean, std):
    """The independent reference: torch.distributions on every latent element, averaged per row."""
    log_prob = torch.distributions.Normal(mean.double(), torch.as_tensor(std, dtype=torch.float64)).log_prob(
        sample.double()
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpo_log_prob_is_the_ddim_posterior_density(tiny_model_dir, tiny_config, prediction_type):
    """Each recorded transition is a draw from DDIM's posterior N(mu, sigma^2) computed here from the scheduler's
    alphas (DDIM paper, eq. 12 and 16), and its recorded log-probability is that Gaussian's density."""
    trainer = ddpo_trainer(
        tiny_model_dir, ddpo_config(tiny_config), scheduler_changes={"prediction_type": prediction_type}
    )
    rl, sampler = trainer.rl, trainer.sampler
    scheduler = sampler.solver.scheduler
    prompts = ["a cat", "a red car"]
    noise = torch.randn(
        2, len(sampler.timesteps) + 1, *trainer.latent_shape, generator=torch.Generator().manual_seed(3)
    )
    states, log_probs = rl.rollout(prompts, noise)
    alphas = scheduler.alphas_cumprod.double()
    step = scheduler.config.num_train_timesteps // len(sampler.timesteps)
    with torch.no_grad():
        conditioning = sampler.encode(prompts)
        for i, t in enumerate(sampler.timesteps.tolist()):
            x = states[:, i].double()
            output = sampler.model_output(states[:, i], sampler.timesteps[i], conditioning).double()
            a_t = alphas[t]
            a_prev = alphas[t - step] if t - step >= 0 else scheduler.final_alpha_cumprod.double()
            if prediction_type == "epsilon":
                eps = output
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            else:
                x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * output
                eps = a_t.sqrt() * output + (1 - a_t).sqrt() * x
            std = ETA * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
            mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
            torch.testing.assert_close(
                states[:, i + 1].double(), mean + std * noise[:, i + 1].double(), rtol=0, atol=1e-4
            )
            torch.testing.assert_close(
                log_probs[:, i].double(), normal_log_prob(states[:, i + 1], mean, std), rtol=1e-5, atol=1e-4
            )
            assert std > 0
    assert log_probs.isfinite().all() and states[:, -1].std() > 0.1


def test_ppo_ratio_is_one_before_the_first_update_and_moves_after(tiny_model_dir, tiny_config):
    trainer = ddpo_trainer(tiny_model_dir, ddpo_config(tiny_config, ddpo_minibatches=1, lr=1e-2))
    rl = trainer.rl
    data = rl.collect()
    rows = torch.randperm(len(data.prompts))  # another order and batch than sampling, as training does

    def log_probs():
        return torch.stack(
            [
                trainer.model(
                    [data.prompts[r] for r in rows.tolist()], data.latents[rows, i], data.latents[rows, i + 1], i
                )[0]
                for i in rl.positions()
            ],
            dim=1,
        ).detach()

    before = log_probs()
    ratio = torch.exp(before - data.log_probs[rows])
    assert (ratio - 1).abs().max().item() <= 1e-5, ratio
    stats = rl.update(data)
    assert stats["grad_norm"] > 0 and stats["clipfrac"] == 0.0  # one update: every ratio was 1, nothing clipped
    after = log_probs()
    assert (after - before).abs().max().item() > 1e-4, "the update did not move the policy"


def test_ppo_clips_the_ratio():
    """Outside [1 - eps, 1 + eps] in the advantage's direction the clipped branch (constant) wins: no gradient."""
    old = torch.zeros(4)
    new = torch.tensor([0.0, 0.5, -0.5, 0.5], requires_grad=True)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0])
    loss, ratio = ppo_loss(new, old, advantages, clip_range=0.1)
    loss.sum().backward()
    assert ratio[0].item() == 1.0
    torch.testing.assert_close(loss.detach(), torch.tensor([-1.0, -1.1, -math.exp(-0.5), math.exp(0.5)]))
    assert new.grad[1] == 0  # ratio above 1 + eps with a positive advantage: clipped
    assert new.grad[2] != 0  # ratio below 1 with a positive advantage: pushed up, not clipped
    assert new.grad[3] != 0  # ratio above 1 with a negative advantage: pushed down, not clipped


def test_per_prompt_advantages():
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    prompts = ["a", "a", "a", "b", "b", "c"]
    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 7.0])
    advantages = tracker.update(prompts, scores)
    for prompt in ("a", "b"):  # enough rewards: normalised within the prompt
        rows = torch.tensor([p == prompt for p in prompts])
        assert advantages[rows].mean().abs() < 1e-5 and advantages[rows].std(unbiased=False) == pytest.approx(
            1, abs=1e-5
        )
    expected_c = (7.0 - scores.mean()) / scores.std(unbiased=False)  # one reward: the round's statistics
    assert advantages[5].item() == pytest.approx(expected_c.item(), rel=1e-5)
    # The buffer keeps the last 4 rewards of a prompt across rounds.
    second = tracker.update(["a", "a"], torch.tensor([5.0, 6.0]))
    kept = torch.tensor([2.0, 3.0, 5.0, 6.0])
    expected = (torch.tensor([5.0, 6.0]) - kept.mean()) / kept.std(unbiased=False)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-5)
    restored = PerPromptStatTracker(4, 2)
    restored.load_state_dict(tracker.state_dict())
    assert restored.buffers == tracker.buffers == {"a": [2.0, 3.0, 5.0, 6.0], "b": [10.0, 30.0], "c": [7.0]}


def test_group_advantages():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 0.0, 10.0, 0.0, 10.0])
    advantages = group_advantages(scores, 4).view(3, 4)
    assert advantages.mean(dim=1).abs().max() < 1e-5
    torch.testing.assert_close(advantages[0].std(unbiased=False), torch.tensor(1.0), rtol=1e-3, atol=1e-3)
    assert advantages[1].abs().max() == 0  # a group of equal rewards teaches nothing
    torch.testing.assert_close(advantages[2], torch.tensor([-1.0, 1.0, -1.0, 1.0]), rtol=1e-4, atol=1e-4)


def test_sde_keeps_the_flow_marginals_and_its_log_prob_is_gaussian():
    """With data x0 ~ N(0, s^2) the rectified-flow velocity is known exactly; sampling the SDE from noise must
    follow the flow's marginals N(0, (1 - t)^2 s^2 + t^2) (up to the discretisation, which shrinks with the
    step: 6% at 40 steps, 2% at 320), and a step's log-probability is the Gaussian density."""
    s, n, steps = 0.5, 40_000, 320
    sigmas = torch.linspace(1, 0, steps + 1)
    generator = torch.Generator().manual_seed(0)

    def velocity(x, t):
        return (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2) * x

    x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    for i in range(steps):
        t = float(sigmas[i])
        if i in (steps // 4, steps // 2, 3 * steps // 4):
            assert x.var().item() == pytest.approx((1 - t) ** 2 * s**2 + t**2, rel=0.03), t
        step = sde_transition(velocity(x, t), x, sigmas, i, noise_level=0.7)
        noise = torch.randn(n, 1, generator=generator, dtype=torch.float64)
        nxt = step.mean.double() + step.std.double() * noise
        if i in (0, steps - 1):
            expected = -(noise**2) / 2 - torch.log(step.std.double() * torch.ones(1)) - 0.5 * math.log(2 * math.pi)
            torch.testing.assert_close(
                normal_log_prob(nxt, step.mean, step.std), expected.squeeze(1), rtol=0, atol=1e-5
            )
        x = nxt
    assert x.var().item() == pytest.approx(s**2, rel=0.03)
    # With noise level 0 the step is the flow's Euler step.
    zero = sde_transition(torch.ones(1, 1), torch.zeros(1, 1), sigmas, 3, noise_level=0.0)
    assert zero.mean.item() == pytest.approx(float(sigmas[4] - sigmas[3])) and zero.std.item() == 0


def test_non_differentiable_reward_is_refused_by_draft_and_taken_by_ddpo(tiny_model_dir, tiny_config):
    for method in DRAFT_METHOD_NAMES:
        with pytest.raises(ValueError, match=r"not differentiable.*--method ddpo.*--method grpo"):
            check_reward_arguments(TrainConfig(method=method, reward="jpeg-compressibility"))
    check_reward_arguments(TrainConfig(method="ddpo", reward="jpeg-compressibility"))
    check_reward_arguments(TrainConfig(method="grpo", reward="owlvit-count"))

    draft = ddpo_trainer(tiny_model_dir, tiny_config, reward="jpeg-compressibility")
    with pytest.raises(ValueError, match=r"is not differentiable.*'ddpo' or 'grpo'"):
        draft.train_step()
    trainer = ddpo_trainer(tiny_model_dir, ddpo_config(tiny_config), reward="jpeg-compressibility")
    metrics = trainer.train_step()
    assert metrics["reward_queries"] == metrics["images_seen"] == tiny_config.batch_size
    assert metrics["reward"] < 0 and metrics["grad_norm"] > 0


def test_methods_are_checked_against_the_family_and_settings(tiny_model_dir, tiny_config, tmp_path):
    sd3 = build_random_pipeline("tiny", seed=0, family="sd3")
    with pytest.raises(ValueError, match=r"--method ddpo does not apply to Stable Diffusion 3.*use --method grpo"):
        Trainer(sd3, get_reward("contrast"), ddpo_config(tiny_config))
    with pytest.raises(ValueError, match=r"--method grpo does not apply to Stable Diffusion 1\.x/2\.x.*--method ddpo"):
        ddpo_trainer(tiny_model_dir, tiny_config.replace(method="grpo", grpo_group_size=2))
    with pytest.raises(ValueError, match="ddpo_minibatches 3 must divide the 2 trajectories"):
        ddpo_config(tiny_config, ddpo_minibatches=3)
    with pytest.raises(ValueError, match="ddpo_eta must be positive"):
        ddpo_config(tiny_config, ddpo_eta=0.0)
    with pytest.raises(ValueError, match="grpo_group_size 3 must be at least 2 and divide the 2"):
        tiny_config.replace(method="grpo", grpo_group_size=3)


def test_ddpo_resume_continues_as_one_run(tiny_model_dir, tiny_config, tmp_path):
    """Two rounds in one run, or one round, a checkpoint, and a resumed second: the same LoRA and statistics."""
    config = ddpo_config(tiny_config, steps=2, num_inference_steps=2, checkpoint_every=1, lr=1e-2, ddpo_min_count=1)
    whole = ddpo_trainer(tiny_model_dir, config.replace(output_dir=str(tmp_path / "whole")))
    whole.train()
    first = ddpo_trainer(tiny_model_dir, config.replace(steps=1, output_dir=str(tmp_path / "split")))
    first.train()
    resumed = ddpo_trainer(tiny_model_dir, config.replace(output_dir=str(tmp_path / "split"), resume=True))
    resumed.train()
    assert resumed.rl.tracker.buffers == whole.rl.tracker.buffers and whole.rl.tracker.buffers
    lora_whole = load_file(str(tmp_path / "whole" / "pytorch_lora_weights.safetensors"))
    lora_split = load_file(str(tmp_path / "split" / "pytorch_lora_weights.safetensors"))
    assert lora_whole.keys() == lora_split.keys()
    for key, value in lora_whole.items():
        torch.testing.assert_close(lora_split[key], value, rtol=0, atol=1e-6)


def test_a_run_whose_ratios_are_mostly_clipped_is_warned_once(tiny_model_dir, tiny_config):
    """A learning rate far past the clip range clips (nearly) every ratio after a round's first optimizer step:
    warned once, after the averaging window, naming the two flags; a round that clips little is not."""
    config = ddpo_config(
        tiny_config, steps=CLIPPING_ROUNDS + 1, num_inference_steps=2, lr=1e-2, ddpo_clip_range=1e-6,
        ddpo_inner_epochs=2, ddpo_min_count=1,
    )  # fmt: skip
    trainer = ddpo_trainer(tiny_model_dir, config)
    with pytest.warns(UserWarning, match=r"ratios that can be clipped.*--lr.*--ddpo-clip-range") as caught:
        trainer.train()
    assert len([w for w in caught if "clipped" in str(w.message)]) == 1
    assert min(trainer.rl.recent_clipfrac) > 0.5  # of the 0.75 that can be clipped
    quiet = ddpo_trainer(tiny_model_dir, config).rl
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(CLIPPING_ROUNDS):
            quiet.warn_if_clipped(0.3)  # 40% of 0.75


@pytest.fixture(scope="module")
def tiny_sd3_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny-sd3"
    build_random_pipeline("tiny", seed=0, family="sd3").save_pretrained(path)
    return path


def test_grpo_records_the_sde_step_and_trains_with_kl_to_the_base(tiny_sd3_dir, tiny_config):
    """On SD3: each recorded step is the flow's Euler step plus the SDE's correction, drawn with the SDE's
    standard deviation (here from the solver's Euler step and the noise level), and its log-probability is that
    Gaussian's density; a round with the KL term trains the LoRA and leaves it trainable."""
    config = tiny_config.replace(method="grpo", num_inference_steps=3, grpo_group_size=2, grpo_kl_weight=0.1, lr=1e-2)
    trainer = Trainer(load_pipeline(tiny_sd3_dir), get_reward("contrast"), config, prompts=["a cat", "a red car"])
    rl, sampler = trainer.rl, trainer.sampler
    prompts = ["a cat", "a cat"]
    noise = torch.randn(2, 4, *trainer.latent_shape, generator=torch.Generator().manual_seed(5))
    states, log_probs = rl.rollout(prompts, noise)
    sigmas = sampler.solver.sigmas
    with torch.no_grad():
        conditioning = sampler.encode(prompts)
        for i in range(3):
            x = states[:, i]
            v = sampler.model_output(x, sampler.timesteps[i], conditioning)
            euler, _ = sampler.solver.step(v, i, x)
            t, dt = float(sigmas[i]), float(sigmas[i + 1] - sigmas[i])
            level = 0.7 * math.sqrt(t / (1 - (float(sigmas[1]) if i == 0 else t)))
            mean = euler + level**2 / (2 * t) * (x + (1 - t) * v) * dt
            std = level * math.sqrt(-dt)
            torch.testing.assert_close(states[:, i + 1], mean + std * noise[:, i + 1], rtol=0, atol=1e-4)
            torch.testing.assert_close(
                log_probs[:, i].double(), normal_log_prob(states[:, i + 1], mean, std), rtol=1e-5, atol=1e-4
            )
    assert float(sigmas[0]) == 1.0  # the first step used the t = 1 rule
    before = {name: p.detach().clone() for name, p in trainer.named_params.items()}
    metrics = trainer.train_step()
    assert metrics["reward_queries"] == config.batch_size and math.isfinite(metrics["kl"]) and metrics["kl"] >= 0
    assert all(p.requires_grad for p in trainer.named_params.values())
    assert max((p - before[name]).abs().max().item() for name, p in trainer.named_params.items()) > 0


@pytest.mark.slow
def test_ddpo_two_processes_equal_one_with_the_same_round(tiny_model_dir, tmp_path):
    """DDP: two processes with batch 1 sample, reward and normalise the round of one process with batch 2 (with
    the default minimum count, a round's advantages use the round's statistics, gathered over the ranks), and (one
    minibatch: the gradient is the round's mean) make the same update through the DDP-wrapped model."""
    (tmp_path / "eval.txt").write_text("a cat\na red car\n")
    loras = []
    for processes, batch in ((1, 2), (2, 1)):
        out = tmp_path / f"run{processes}"
        launcher = [*LAUNCHER, f"--nproc_per_node={processes}", "-m"] if processes > 1 else [sys.executable, "-m"]
        command = [
            *launcher,
            "finetune", "train", "--model", str(tiny_model_dir), "--reward", "jpeg-compressibility", "--method",
            "ddpo", "--ddpo-minibatches", "1", "--steps", "2", "--batch-size", str(batch),
            "--resolution", "64", "--num-inference-steps", "2", "--guidance-scale", "3", "--lr", "0.01",
            "--output-dir", str(out), "--device", "cpu", "--eval-every", "100", "--eval-prompts",
            str(tmp_path / "eval.txt"),
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        loras.append(load_file(str(out / "pytorch_lora_weights.safetensors")))
    single, ddp = loras
    assert max(v.abs().max().item() for k, v in single.items() if "lora.up" in k) > 1e-4
    # AdamW's first steps move each weight by about lr x g / (|g| + eps): the down factors' gradients are exactly 0 in
    # step 1 (the up factors start at 0) and tiny in step 2, so float rounding in the all-reduce can move a rare
    # entry by a fraction of lr (0.01). A wrong update (e.g. advantages from one rank's rewards) differs everywhere.
    close = total = 0
    for key, value in single.items():
        difference = (ddp[key] - value).abs()
        assert difference.max().item() < 0.01, key
        close += int((difference <= 1e-5).sum())
        total += value.numel()
    assert close >= 0.999 * total, f"{total - close} of {total} LoRA entries differ by more than 1e-5"
