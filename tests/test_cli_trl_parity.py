"""`trl-distill` as a superset of `trl`'s command line: dataset mixtures and `data_files`, streaming, the student's
`model_init_kwargs`, the teacher's loading fields, and `accelerate launch` options (`--num_processes`,
`--accelerate_config`) with `trl`'s policy for keys that are none of the dataclasses' fields."""

import json

import pytest
import torch
import yaml
from datasets import IterableDataset

from trl_distill import cli, launcher
from trl_distill.testing import tiny_causal_lm


def _recipe(tmp_path, **config):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "use_cpu": True, **config}))
    return str(path)


def _conversations(tmp_path, name, n):
    path = tmp_path / name
    rows = [{"messages": [{"role": "user", "content": f"{i}+1="}, {"role": "assistant", "content": str(i + 1)}]}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def _parse(command, argv):
    return cli.make_parser(command).parse_args_and_config(args=argv, fail_with_unknown_args=False)


def test_dataset_mixture_with_data_files_and_streaming(tmp_path):
    first, second = _conversations(tmp_path, "a.jsonl", 6), _conversations(tmp_path, "b.jsonl", 4)
    mixture = [{"path": "json", "data_files": first, "split": "train"},
               {"path": "json", "data_files": second, "split": "train", "columns": ["messages"]}]
    script_args, _, _ = _parse("gkd", ["--config", _recipe(tmp_path, datasets=mixture, test_split_size=0.2)])
    train, evaluation = cli.load_datasets(script_args, format="messages")
    assert len(train) + len(evaluation) == 10 and len(evaluation) == 2
    assert train.column_names == ["messages"]

    # TRL's ScriptArguments fields: a local dataset by name, streamed
    script_args, _, _ = _parse("gkd", ["--config", _recipe(tmp_path, dataset_name="json", dataset_streaming=True),
                                       "--dataset_config", "default"])
    script_args.dataset_name = str(tmp_path)  # a folder of JSON files, loaded by `load_dataset(path)`
    train, _ = cli.load_datasets(script_args, format="messages")
    assert isinstance(train, IterableDataset) and len(list(train)) == 10

    script_args.dataset_train_split = "training"
    with pytest.raises(ValueError, match="dataset_train_split='training' is not a split of the dataset"):
        cli.load_datasets(script_args, format="messages")
    with pytest.raises(ValueError, match="`dataset_name`.*or a `datasets` mixture"):
        cli.load_datasets(_parse("gkd", ["--config", _recipe(tmp_path)])[0], format="messages")


def test_student_model_init_kwargs_are_used(tmp_path, tokenizer):
    tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    _, training_args, model_args = _parse("gkd", [
        "--config", _recipe(tmp_path, model_name_or_path=str(tmp_path / "student"),
                            model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "eager"}),
        "--dtype", "float32",
    ])
    model, _ = cli._student_and_tokenizer(model_args, training_args)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"  # model_init_kwargs win
    assert training_args.model_init_kwargs is None  # consumed: the trainer gets a built model


def test_teacher_loading_fields_follow_trl_distillation(tmp_path):
    script_args, training_args, model_args = _parse("distill-dpo", [
        "--config", _recipe(tmp_path, teacher_model_name_or_path="t", teacher_model_revision="v2",
                            trust_remote_code=True, attn_implementation="sdpa", dtype="bfloat16",
                            teacher_model_init_kwargs={"attn_implementation": "eager"}),
    ])
    assert cli.teacher_init_kwargs(script_args, training_args, model_args) == {
        "revision": "v2", "trust_remote_code": True, "attn_implementation": "eager", "dtype": "bfloat16"}
    # a 4-bit teacher keeps its compute dtype for the unquantized layers
    training_args.teacher_quantization = "4bit"
    assert "dtype" not in cli.teacher_init_kwargs(script_args, training_args, model_args)


class RecordedLaunch:
    def __init__(self):
        self.calls = []

    def __call__(self, accelerate_args):
        self.calls.append(accelerate_args)


@pytest.fixture
def not_launched(monkeypatch):
    for name in (launcher.LAUNCHED_ENV, "ACCELERATE_MIXED_PRECISION", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


def test_launcher_options_go_to_accelerate_launch(tmp_path, not_launched, monkeypatch):
    recipe = _recipe(tmp_path, dataset_name="addition", num_processes=2, mixed_precision="no")
    argv = ["--config", recipe, "--max_steps", "2", "--accelerate_config", "zero2", "--main_process_port", "29511"]
    recorded = RecordedLaunch()
    assert launcher.launch_if_asked(cli.make_parser("gkd"), "gkd", argv, launch_command_fn=recorded)
    monkeypatch.delenv(launcher.LAUNCHED_ENV)  # set for the launched processes
    (args,) = recorded.calls
    assert args.num_processes == 2 and args.mixed_precision == "no" and args.main_process_port == 29511
    assert args.config_file.endswith("zero2.yaml")  # TRL's shipped DeepSpeed ZeRO-2 config
    assert args.module and args.training_script == "trl_distill.cli"
    assert args.training_script_args == ["gkd", "--config", recipe, "--max_steps", "2"]


def test_unknown_keys_are_refused_as_with_trl(tmp_path, not_launched):
    recorded = RecordedLaunch()
    for argv in (["--config", _recipe(tmp_path, dataset_name="addition", lora_rank=16)],
                 ["--use_cpu", "true", "--output_dir", str(tmp_path), "--lora_rank", "16"]):
        with pytest.raises(ValueError, match="trl-distill okd: unknown argument.s. --lora_rank: neither fields"):
            launcher.launch_if_asked(cli.make_parser("okd"), "okd", argv, launch_command_fn=recorded)
        with pytest.raises(ValueError, match="--lora_rank"):  # through the command itself
            cli.main(["okd", *argv])
    assert not recorded.calls
    # nothing to launch: the command trains in this process
    assert not launcher.launch_if_asked(cli.make_parser("okd"), "okd", ["--config", _recipe(tmp_path)])


def test_a_launched_process_trains_and_ignores_the_launcher_keys(tmp_path, monkeypatch):
    monkeypatch.setenv(launcher.LAUNCHED_ENV, "1")
    recipe = _recipe(tmp_path, dataset_name="addition", num_processes=2)
    assert not launcher.launch_if_asked(cli.make_parser("redi"), "redi", ["--config", recipe])
    script_args, training_args, _ = _parse("redi", ["--config", recipe])
    assert script_args.dataset_name == "addition" and training_args.output_dir == str(tmp_path / "out")


def test_without_subsequence():
    assert launcher.without_subsequence(["a", "--n", "2", "b", "2"], ["--n", "2"]) == ["a", "b", "2"]


def test_ignore_bias_buffers_leaves_boolean_buffers_out_of_ddp(tokenizer):
    model = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    model.model.register_buffer("causal_mask", torch.ones(4, 4, dtype=torch.bool))
    assert cli.ignore_bool_buffers_in_ddp(model) == ["model.causal_mask"]
    assert model._ddp_params_and_buffers_to_ignore == ["model.causal_mask"]
    script_args, _, _ = _parse("redi", ["--ignore_bias_buffers", "true", "--use_cpu", "true", "--output_dir", "x"])
    assert script_args.ignore_bias_buffers
