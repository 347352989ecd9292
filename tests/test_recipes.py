"""The GPU recipes (examples/*_qwen_qlora.yaml) parse through the CLI's parser and validate, on the CPU.

Parsing runs every config's own checks (`__post_init__`) and refuses unknown keys; the tests then check what a
24 GB GPU run depends on: bf16 weights and compute for the student and the teacher, a 4-bit teacher (or student),
LoRA, gradient checkpointing. `--use_cpu true` keeps TrainingArguments' bf16 check from asking for a GPU.
"""

from pathlib import Path

import pytest
import torch
from trl import get_peft_config, get_quantization_config

from trl_distill import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RECIPES = {"gkd": "gkd", "okd": "okd", "distill_dpo": "distill-dpo", "adpo": "adpo", "redi": "redi"}


def test_every_qwen_recipe_is_covered():
    assert {p.name for p in EXAMPLES.glob("*_qwen_qlora.yaml")} == {f"{name}_qwen_qlora.yaml" for name in RECIPES}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_qwen_recipe_parses_and_validates(name, tmp_path):
    command = RECIPES[name]
    recipe = EXAMPLES / f"{name}_qwen_qlora.yaml"
    script_args, args, model_args = cli.make_parser(command).parse_args_and_config(
        args=["--config", str(recipe), "--output_dir", str(tmp_path), "--use_cpu", "true"]
    )
    assert type(args) is cli.COMMANDS[command][1]()
    assert script_args.dataset_name and model_args.model_name_or_path.startswith("Qwen/")
    assert args.bf16 and args.gradient_checkpointing
    assert model_args.dtype == "bfloat16"
    peft_config = get_peft_config(model_args)
    assert peft_config is not None and peft_config.r == 16 and "down_proj" in peft_config.target_modules

    if name == "redi":  # 4-bit student, no teacher
        quantization = get_quantization_config(model_args)
        assert quantization.load_in_4bit and quantization.bnb_4bit_compute_dtype == torch.bfloat16
    else:
        assert args.teacher_model_name_or_path.startswith("Qwen/")
        assert args.teacher_quantization == "4bit"
        assert args.teacher_model_init_kwargs == {"dtype": "bfloat16"}

