"""The training CLI as a newcomer meets it: help with defaults and a recipe, arguments checked before anything is
loaded, output directories never mixed, the embedded world by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import finetune.pipelines
from finetune.__main__ import build_parser, config_from_args, main, resume_command
from finetune.outputs import claim_output_dir
from finetune.trainer import RUN_ARTEFACTS, Trainer
from finetune.world import SHIPPED_PIPELINE, WORLD_DDPO_TRAINING, WORLD_TRAINING
from rewards import get_reward


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the CLI gets as far as loading a pipeline."""

    def trap(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the arguments were checked")

    monkeypatch.setattr(finetune.pipelines, "load_pipeline", trap)


def run_cli(args, capsys):
    code = main(args)
    return code, capsys.readouterr().err


def test_help_shows_defaults_and_a_recipe_without_heavy_imports():
    probe = (
        "import sys; from finetune.__main__ import build_parser; "
        "text = build_parser()._subparsers._group_actions[0].choices['train'].format_help(); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'peft') if m in sys.modules)); print(text)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    heavy, _, text = result.stdout.partition("\n")
    assert heavy == "[]"
    assert "--lr LR" in text and "(default: 0.0004)" in text and "(default: draft-k)" in text
    assert "--model world" in text and "--resume" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--model is required"),
        (["--model", "/nonexistent/dir"], "/nonexistent/dir: no such directory"),
        (["--model", "world", "--reward", "aesthtic"], "unknown reward 'aesthtic'. Did you mean 'aesthetic'"),
        (["--model", "world", "--prompts", "animls"], "Did you mean the built-in set 'animals'"),
        (["--model", "world", "--reward", "shapes", "--option", "objectiv=size"], "has no option objectiv"),
        (["--model", "world", "--reward", "shapes=1,brightness=1", "--option", "objective=size"], "single reward"),
        (["--model", "world", "--reward", "shapes"], "--option objective="),  # the hint in the CLI's spelling
        (["--model", "world", "--reward", "jpeg-compressibility"], "'jpeg-compressibility' is not differentiable"),
    ],
)
def test_arguments_are_checked_before_loading(args, message, tmp_path, capsys, no_loading):
    code, err = run_cli(["train", *args, "--output-dir", str(tmp_path / "run")], capsys)
    assert code == 2 and message in err, err


def test_reward_options_reach_the_reward(tmp_path):
    args = ["train", "--model", "world", "--reward", "shapes", "--option", "objective=size", "--option", "mode=grow"]
    config = config_from_args(build_parser().parse_args(args))
    assert config.reward_options == {"objective": "size", "mode": "grow"}
    config.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["reward_options"] == config.reward_options


def test_empty_prompt_file_and_non_pipeline_directory(tmp_path, capsys, no_loading):
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    code, err = run_cli(["train", "--model", "world", "--prompts", str(tmp_path / "empty.txt")], capsys)
    assert code == 2 and "holds no prompts" in err
    (tmp_path / "not-a-model").mkdir()
    code, err = run_cli(["train", "--model", str(tmp_path / "not-a-model")], capsys)
    assert code == 2 and "no model_index.json" in err


def test_non_empty_output_directory_is_refused(tmp_path, capsys, no_loading):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    code, err = run_cli(["train", "--model", "world", "--output-dir", str(out)], capsys)
    assert code == 2 and "is not empty (metrics.jsonl)" in err and "--resume" in err and "--overwrite" in err
    code, err = run_cli(["train", "--model", "world", "--output-dir", str(out), "--resume", "--overwrite"], capsys)
    assert code == 2 and "give one" in err
    code, err = run_cli(["demo", "--output-dir", str(out)], capsys)
    assert code == 2 and "--resume" not in err and "--overwrite to replace the demo" in err


def test_overwrite_removes_only_the_previous_runs_files(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    claim_output_dir(out, RUN_ARTEFACTS, resume=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_trainer_refuses_to_mix_runs(tiny_model_dir, tiny_config):
    config = tiny_config.replace(steps=1)
    Trainer(finetune.pipelines.load_pipeline(tiny_model_dir), get_reward("contrast"), config).train()
    with pytest.raises(FileExistsError, match="is not empty"):
        Trainer(finetune.pipelines.load_pipeline(tiny_model_dir), get_reward("contrast"), config).train()


def test_overwritten_run_logs_one_history(tiny_model_dir, tiny_config):
    config = tiny_config.replace(steps=1)
    Trainer(finetune.pipelines.load_pipeline(tiny_model_dir), get_reward("contrast"), config).train()
    pipeline = finetune.pipelines.load_pipeline(tiny_model_dir)
    Trainer(pipeline, get_reward("contrast"), config.replace(overwrite=True)).train()
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1]


def test_world_model_preset(tmp_path):
    parser = build_parser()
    config = config_from_args(parser.parse_args(["train", "--model", "world", "--steps", "5"]))
    assert config.model == str(SHIPPED_PIPELINE) and config.steps == 5
    assert (config.resolution, config.num_inference_steps, config.reward) == (
        WORLD_TRAINING["resolution"],
        WORLD_TRAINING["num_inference_steps"],
        WORLD_TRAINING["reward"],
    )
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"num_inference_steps": 4}))
    args = ["train", "--model", "world", "--config", str(tmp_path / "c.yaml"), "--resolution", "64"]
    config = config_from_args(parser.parse_args(args))
    assert (config.num_inference_steps, config.resolution) == (4, 64)  # file and flags beat the preset
    assert config.prompts == WORLD_TRAINING["prompts"]  # and what the file does not give stays the preset's


def test_world_ddpo_preset():
    """--method ddpo in the world takes the DDPO settings over the DRaFT ones; flags still win; DRaFT keeps its own."""
    parser = build_parser()
    fields = list(WORLD_DDPO_TRAINING)
    ddpo = config_from_args(parser.parse_args(["train", "--model", "world", "--method", "ddpo", "--lr", "1e-3"]))
    assert {f: getattr(ddpo, f) for f in fields} == {**WORLD_DDPO_TRAINING, "lr": 1e-3}
    assert ddpo.num_inference_steps == WORLD_TRAINING["num_inference_steps"]  # the rest stays the world's
    draft = config_from_args(parser.parse_args(["train", "--model", "world"]))
    assert (draft.lr, draft.batch_size) == (WORLD_TRAINING["lr"], WORLD_TRAINING["batch_size"])


def test_resume_command():
    argv = ["train", "--model", "m dir", "--overwrite", "--steps", "9"]
    assert resume_command(argv) == "python -m finetune train --model 'm dir' --steps 9 --resume"
