"""The `trl-distill` command line: recipes parsed by TRL's TrlParser, offline assets, help and errors."""

from pathlib import Path

import pytest
import yaml

from trl_distill import cli
from trl_distill.testing import tiny_causal_lm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def assets(tmp_path, tokenizer):
    """A tiny teacher and student saved like `trl-distill addition-assets` writes them (untrained, for speed)."""
    for name, (width, layers) in {"teacher": (64, 2), "student": (32, 1)}.items():
        tiny_causal_lm(tokenizer, hidden_size=width, num_layers=layers, num_heads=2).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    return tmp_path


@pytest.mark.parametrize(
    "command, recipe, flags",
    [
        ("gkd", "gkd_addition.yaml", ["--loss_type", "tvd"]),
        ("okd", "okd.yaml", ["--alpha", "0.2"]),
        ("distill-dpo", "distill_dpo.yaml", ["--mode", "dckd"]),
        ("adpo", "adpo.yaml", ["--anchor", "fixed"]),
        ("redi", "redi.yaml", ["--alpha", "0.5"]),
    ],
)
def test_recipe_runs_end_to_end(assets, command, recipe, flags):
    config = yaml.safe_load((EXAMPLES / recipe).read_text())
    config.update(
        model_name_or_path=str(assets / "student"),
        output_dir=str(assets / "out"),
        addition_num_train=32,
        addition_num_eval=8,
    )
    if "teacher_model_name_or_path" in config:
        config["teacher_model_name_or_path"] = str(assets / "teacher")
    path = assets / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    # command-line flags override the YAML, as with TRL's scripts
    cli.main([command, "--config", str(path), "--max_steps", "2", "--per_device_train_batch_size", "4",
              "--disable_tqdm", "true", *flags])
    assert (assets / "out" / "model.safetensors").exists()


def test_every_recipe_parses(tmp_path):
    from trl import ModelConfig, TrlParser

    for recipe in sorted(EXAMPLES.glob("*.yaml")):
        # recipes are named after their sub-command: gkd_addition.yaml, distill_dpo.yaml, ...
        command = next((c for c in cli.COMMANDS if recipe.stem.replace("_", "-").startswith(c)), None)
        if command is None:
            continue
        config_class = cli.COMMANDS[command][1]()
        parser = TrlParser((cli.DistillScriptArguments, config_class, ModelConfig))
        # bf16 recipes target GPUs; parse them with bf16 off so the CPU check in TrainingArguments does not fire
        _, args, _ = parser.parse_args_and_config(
            args=["--config", str(recipe), "--output_dir", str(tmp_path), "--bf16", "false"]
        )
        assert args.output_dir == str(tmp_path)


def test_help_lists_commands(capsys):
    cli.main(["--help"])
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit, match="unknown sub-command 'gdk'"):
        cli.main(["gdk"])


def test_addition_assets_writes_teacher_and_student(tmp_path, monkeypatch):
    monkeypatch.setenv("TRL_DISTILL_CACHE", str(tmp_path / "cache"))
    cli.main(["addition-assets", "--output_dir", str(tmp_path / "assets"), "--teacher_steps", "3"])
    for name in ("teacher", "student"):
        assert (tmp_path / "assets" / name / "config.json").exists()
        assert (tmp_path / "assets" / name / "tokenizer.json").exists()


def test_rerun_refuses_the_saved_run_then_resumes_or_overwrites(assets):
    """A second run into the same output_dir stops before training; `--resume_from_checkpoint true` continues from
    the last complete checkpoint, `--overwrite_output_dir true` starts over."""
    config = yaml.safe_load((EXAMPLES / "gkd_addition.yaml").read_text())
    config.update(
        model_name_or_path=str(assets / "student"),
        teacher_model_name_or_path=str(assets / "teacher"),
        output_dir=str(assets / "out"),
        addition_num_train=32,
        addition_num_eval=8,
        save_strategy="steps",
        save_steps=1,
        eval_strategy="no",
    )
    path = assets / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    base = ["gkd", "--config", str(path), "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    cli.main([*base, "--max_steps", "2"])
    weights = (assets / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="overwrite_output_dir"):
        cli.main([*base, "--max_steps", "2"])
    assert (assets / "out" / "model.safetensors").read_bytes() == weights

    cli.main([*base, "--max_steps", "3", "--resume_from_checkpoint", "true"])
    assert (assets / "out" / "checkpoint-3").is_dir()
    state = yaml.safe_load((assets / "out" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    cli.main([*base, "--max_steps", "1", "--overwrite_output_dir", "true"])


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_field_has_help_text(command, capsys):
    """`trl-distill <command> --help` documents every field trl-distill adds (TRL documents its own)."""
    from trl_distill.trainers._common import added_fields

    fields = added_fields(cli.COMMANDS[command][1]())
    assert fields
    assert [f.name for f in fields if not f.metadata.get("help")] == []
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = capsys.readouterr().out
    for f in fields:
        assert f"--{f.name}" in help_text, f.name
