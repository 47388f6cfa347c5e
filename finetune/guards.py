"""Guards against reward over-optimisation (reward hacking): independent judges, early stopping on a judge with
the best LoRA kept, and anchoring the LoRA model's predictions to the base model's.

* Judges are rewards scored on the held-out evaluation images at every evaluation, never trained on: the trainer
  scores them under ``torch.no_grad`` on finished images, and they are not in the optimizer.
* :class:`EarlyStopping` follows one evaluation metric (a judge, the held-out training reward or the diversity)
  and keeps a copy of the LoRA at its best; the run ends when the metric has been more than ``drop`` below its
  best for ``patience`` evaluations in a row, and the final LoRA is the best one.
* :class:`Anchor` adds ``weight * mean((prediction - base prediction)^2)`` over the sampled grad steps to the loss;
  the base prediction is the same denoiser with its adapters disabled (no second copy of the weights), at the cost
  of one extra no-grad denoiser call per grad step.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from finetune.lora import adapters_disabled

PREFERENCE_REWARDS = ("aesthetic", "hpsv2.1", "imagereward", "pickscore")
"""The zoo's learned human-preference rewards: the default judges of a run on a real model (those whose weights
are available; the training reward's own members are left out, its held-out score is logged as ``eval_reward``)."""
WORLD_JUDGES = ("shapes-judge-match", "shapes-geometry")
"""Default judges in the embedded world, both independent of the ``shapes`` classifier that world rewards train
on: prompt agreement read by the independent judge (``shapes-judge-match``: another network trained with
another seed on other scenes), and the shapes' size measured with no learned parts (``shapes-geometry``, by
segmentation against the background)."""
RUN_END_KEY = "early_stop_metric"
"""Key of early stopping's closing record in ``metrics.jsonl`` (the last line of a run that tracks a metric)."""
JUDGE_PREFIX = "judge/"
"""Metric key prefix of a judge's mean held-out score (``judge/aesthetic``)."""
NO_JUDGES = ("none",)
"""``--eval-rewards none``: no judges."""


def default_eval_rewards(training_spec: str, world: bool) -> tuple[str, ...]:
    """The judges of a command-line run that names none: the world's prompt agreement, or the zoo's preference
    rewards other than the training reward's members."""
    from rewards.combine import parse_reward_spec

    if world:
        return WORLD_JUDGES
    trained = set(parse_reward_spec(training_spec))
    return tuple(name for name in PREFERENCE_REWARDS if name not in trained)


def check_eval_rewards(specs: Sequence[str]) -> None:
    """Refuse unknown reward names in judge specs before anything is loaded."""
    from rewards.combine import parse_reward_spec
    from rewards.registry import get_entry

    for spec in specs:
        for name in parse_reward_spec(spec):
            get_entry(name)


def build_judges(
    specs: Sequence[str],
    pretrained: bool = True,
    skip_unavailable: bool = False,
    normalize: bool = False,
) -> dict[str, Any]:
    """Judges by spec (a reward name or a weighted mix, built like the training reward by
    :func:`rewards.cli.build_reward_from_spec`; ``("none",)``: no judges). With ``skip_unavailable``, a judge
    whose weights or packages are missing is left out with a warning giving the reason (the defaults); otherwise
    that is an error."""
    from rewards.cli import build_reward_from_spec
    from rewards.weights import MissingWeightsError

    judges: dict[str, Any] = {}
    if tuple(specs) == NO_JUDGES:
        return judges
    for spec in specs:
        if spec in judges:
            raise ValueError(f"eval reward {spec!r} is given twice")
        try:
            judges[spec] = build_reward_from_spec(spec, {}, None, pretrained=pretrained, normalize=normalize)
        except (MissingWeightsError, ImportError) as err:
            if not skip_unavailable:
                raise
            warnings.warn(f"judge {spec!r} skipped: unavailable ({type(err).__name__}: {err})", stacklevel=2)
    return judges


# ------------------------------------------------------------------------------------------------ early stopping
@dataclass(frozen=True)
class EarlyStopSpec:
    """``judge=NAME,patience=N,drop=X``: follow metric NAME (a judge's spec, ``reward`` for the held-out training
    reward, or ``diversity``); stop once it has been more than X below its best for N evaluations in a row."""

    judge: str
    patience: int = 3
    drop: float = 0.0

    @classmethod
    def parse(cls, text: str) -> EarlyStopSpec:
        fields_ = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("judge", "patience", "drop"):
                raise ValueError(
                    f"--early-stop {text!r}: expected 'judge=NAME,patience=N,drop=X' (patience and drop optional), "
                    f"e.g. 'judge=aesthetic,patience=3,drop=0.05'"
                )
            fields_[key.strip()] = value.strip()
        if "judge" not in fields_:
            raise ValueError(f"--early-stop {text!r}: name the metric to follow, e.g. 'judge=aesthetic'")
        try:
            spec = cls(fields_["judge"], int(fields_.get("patience", 3)), float(fields_.get("drop", 0.0)))
        except ValueError:
            raise ValueError(f"--early-stop {text!r}: patience must be an integer and drop a number") from None
        if spec.patience < 1 or spec.drop < 0:
            raise ValueError(f"--early-stop {text!r}: patience must be at least 1 and drop at least 0")
        return spec

    def metric_key(self) -> str:
        """The evaluation metric followed."""
        return {"reward": "eval_reward", "diversity": "diversity"}.get(self.judge, JUDGE_PREFIX + self.judge)

    def check_available(self, judges: Sequence[str]) -> None:
        if self.judge not in ("reward", "diversity", *judges):
            raise ValueError(
                f"--early-stop follows judge '{self.judge}', which is not one of this run's eval rewards "
                f"({', '.join(judges) or 'none'}); add it to --eval-rewards or follow 'reward' or 'diversity'"
            )


@dataclass
class EarlyStopping:
    """Follows one evaluation metric, keeping a CPU copy of the trainable parameters at its best value."""

    spec: EarlyStopSpec
    best: float = float("-inf")
    best_step: int | None = None
    bad_evaluations: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    def observe(self, step: int, metrics: Mapping[str, Any], params: Mapping[str, torch.Tensor]) -> bool:
        """Record one evaluation; return whether training should stop."""
        key = self.spec.metric_key()
        if key not in metrics:
            raise KeyError(f"early stopping follows '{key}', which this evaluation did not measure")
        value = float(metrics[key])
        if value > self.best:
            self.best, self.best_step, self.bad_evaluations = value, step, 0
            self.best_state = {name: p.detach().to("cpu", copy=True) for name, p in params.items()}
        elif self.best - value > self.spec.drop:
            self.bad_evaluations += 1
        else:
            self.bad_evaluations = 0
        return self.bad_evaluations >= self.spec.patience

    @torch.no_grad()
    def restore(self, params: Mapping[str, torch.Tensor]) -> None:
        """Copy the best parameters back (bit for bit)."""
        for name, p in params.items():
            p.copy_(self.best_state[name])

    def state_dict(self) -> dict[str, Any]:
        """The tracking state for a checkpoint (the best parameters are saved apart: :attr:`best_state`)."""
        return {
            "metric": self.spec.metric_key(),
            "best": self.best,
            "best_step": self.best_step,
            "bad_evaluations": self.bad_evaluations,
        }

    def load_state_dict(self, state: Mapping[str, Any], best_state: Mapping[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict` and best parameters (``--resume``)."""
        if state["best_step"] is not None and best_state is None:
            raise ValueError(
                f"the checkpoint's early-stopping state names a best step ({state['best_step']}) but holds no best "
                f"LoRA; the checkpoint is incomplete: resume from an earlier one or start afresh"
            )
        self.best, self.best_step = float(state["best"]), state["best_step"]
        self.bad_evaluations = int(state["bad_evaluations"])
        self.best_state = {name: t.clone() for name, t in (best_state or {}).items()}

    def summary(self, stopped_at: int) -> dict[str, Any]:
        """Metrics of the final record: which step's LoRA is kept, and why."""
        return {
            "step": stopped_at,
            RUN_END_KEY: self.spec.metric_key(),
            "best_step": self.best_step,
            "best_value": self.best,
        }


# ---------------------------------------------------------------------------------------------------- anchoring
class Anchor:
    """Collects ``mean((prediction - base prediction)^2)`` at every grad-step denoiser call (see
    :meth:`finetune.sampling.Sampler.step`); the base prediction is the same denoiser with its LoRA adapters
    disabled, computed under ``torch.no_grad`` (one extra denoiser call per grad step, no extra weights)."""

    def __init__(self, denoisers: Sequence[torch.nn.Module], predict: Callable[..., torch.Tensor]) -> None:
        self.denoisers = list(denoisers)
        self.predict = predict
        self.terms: list[torch.Tensor] = []

    def record(self, output: torch.Tensor, *inputs: Any) -> None:
        """Add the squared distance of one grad step's prediction ``output`` from the base model's."""
        with torch.no_grad(), adapters_disabled(*self.denoisers):
            base = self.predict(*inputs)
        self.terms.append((output.float() - base.float()).pow(2).mean())

    def pop(self) -> torch.Tensor | None:
        """The mean penalty over the grad steps recorded since the last call (``None`` if none were)."""
        terms, self.terms = self.terms, []
        return torch.stack(terms).mean() if terms else None


# ------------------------------------------------------------------------------------------- at every evaluation
class EvaluationGuards:
    """What a trainer adds to each held-out evaluation: the judges' means, the diversity and its collapse warning,
    and early stopping."""

    def __init__(
        self,
        judges: Mapping[str, Any],
        reward: object,
        diversity_warn: float,
        early_stop: str | None,
        device: torch.device | str = "cpu",
    ) -> None:
        from finetune.diversity import feature_space

        self.judges = dict(judges)
        self.space = feature_space([*self.judges.values(), reward])
        self.diversity_warn = diversity_warn
        self.device = device
        self.base_diversity: float | None = None
        self.early_stopping = None
        if early_stop is not None:
            spec = EarlyStopSpec.parse(early_stop)
            spec.check_available(list(self.judges))
            self.early_stopping = EarlyStopping(spec)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps so that a resumed run's guards continue where they were: the base model's
        diversity and the early-stopping state (its best parameters: :meth:`best_parameters`)."""
        state: dict[str, Any] = {"base_diversity": self.base_diversity}
        if self.early_stopping is not None:
            state["early_stop"] = self.early_stopping.state_dict()
        return state

    def best_parameters(self) -> dict[str, torch.Tensor] | None:
        """The early-stopping copy of the best parameters, if there is one (saved beside the checkpoint's LoRA)."""
        if self.early_stopping is None or self.early_stopping.best_step is None:
            return None
        return self.early_stopping.best_state

    def load_state_dict(self, state: Mapping[str, Any], best_parameters: Mapping[str, torch.Tensor] | None) -> None:
        """Continue from a checkpoint's :meth:`state_dict`. Early stopping restarts (with a warning) when the
        checkpoint followed another metric or none."""
        self.base_diversity = state.get("base_diversity")
        if self.early_stopping is None:
            return
        saved = state.get("early_stop")
        followed = self.early_stopping.spec.metric_key()
        if saved is None or saved["metric"] != followed:
            before = f"followed '{saved['metric']}'" if saved else "had no early stopping"
            warnings.warn(
                f"--resume: the checkpoint {before}; early stopping on '{followed}' starts afresh at the next "
                f"evaluation",
                stacklevel=2,
            )
            return
        self.early_stopping.load_state_dict(saved, best_parameters)

    def metrics(self, images: torch.Tensor, seeds: int, judge_scores: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Judge means and the diversity (if there are 2 or more seeds) of one evaluation's images."""
        from finetune.diversity import diversity

        result: dict[str, Any] = {f"{JUDGE_PREFIX}{name}": s.mean().item() for name, s in judge_scores.items()}
        if seeds >= 2:
            result["diversity"] = diversity(images, seeds, self.space, self.device).mean().item()
        return result

    def observe(self, step: int, metrics: dict[str, Any], params: Mapping[str, torch.Tensor]) -> bool:
        """Add the diversity ratio (and warn on a collapse) to ``metrics``; return whether early stopping says stop."""
        if "diversity" in metrics:
            if self.base_diversity is None and step == 0:
                self.base_diversity = metrics["diversity"]
            if self.base_diversity:
                ratio = metrics["diversity"] / self.base_diversity
                metrics["diversity_ratio"] = ratio
                if ratio < self.diversity_warn:
                    warnings.warn(
                        f"step {step}: held-out diversity {metrics['diversity']:.4g} is {ratio:.0%} of the base "
                        f"model's ({self.base_diversity:.4g}; in {self.space.name}): the samples are collapsing, "
                        f"a sign of reward hacking. Consider --early-stop, --anchor-weight or a lower --lr.",
                        stacklevel=2,
                    )
        return self.early_stopping is not None and self.early_stopping.observe(step, metrics, params)
