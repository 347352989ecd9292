"""Drop-in: a TRL training script runs with trl-distill after swapping only its import line and class names.

`tests/drop_in/{sft,gkd,dpo}.py` are TRL scripts as a TRL user writes them (model and tokenizer from a directory, a
JSON dataset, `XConfig(...)`, `XTrainer(...)`, `train()`, `save_model()`); they run as they are with TRL. Each test
runs the original and the swapped script in this process (`runpy`) and checks that the TRL fields keep their
meaning: `max_steps` optimizer steps, a log line every `logging_steps`, the learning rate following
`lr_scheduler_type` / `warmup_steps`, and `output_dir` holding the saved model (a PEFT adapter with `peft_config`).
"""

import difflib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from trl_distill import addition
from trl_distill.testing import tiny_causal_lm

SCRIPTS = Path(__file__).resolve().parent / "drop_in"

# What every script sets (and both runs must honour).
MAX_STEPS, LOGGING_STEPS, BATCH, LEARNING_RATE, WARMUP_STEPS = 4, 2, 4, 1e-3, 1

# trainer -> (TRL script, {text in the TRL script: its replacement}); `{teacher}` is the saved teacher's path.
SWAPS = {
    "OKDTrainer": ("sft.py", {
        "from trl import SFTConfig, SFTTrainer": "from trl_distill import OKDConfig, OKDTrainer",
        "SFTConfig(": "OKDConfig(",
        "SFTTrainer(": "OKDTrainer(\n    teacher_model={teacher},",
    }),
    "GKDVariant": ("gkd.py", {
        "from trl.experimental.gkd import GKDConfig, GKDTrainer":
            "from trl_distill import GKDVariant, GKDVariantConfig",
        "GKDConfig(": "GKDVariantConfig(",
        "GKDTrainer(": "GKDVariant(",
    }),
    "DistillDPOTrainer": ("dpo.py", {
        "from trl import DPOConfig, DPOTrainer": "from trl_distill import DistillDPOConfig, DistillDPOTrainer",
        "DPOConfig(": "DistillDPOConfig(",
        "DPOTrainer(": "DistillDPOTrainer(\n    teacher_model={teacher},",
    }),
    "ADPOTrainer": ("dpo.py", {
        "from trl import DPOConfig, DPOTrainer": "from trl_distill import ADPOConfig, ADPOTrainer",
        "DPOConfig(": "ADPOConfig(",
        "DPOTrainer(": "ADPOTrainer(",
    }),
    "REDITrainer": ("dpo.py", {
        "from trl import DPOConfig, DPOTrainer": "from trl_distill import REDIConfig, REDITrainer",
        "DPOConfig(": "REDIConfig(",
        "DPOTrainer(": "REDITrainer(",
    }),
}  # fmt: skip


def swap(source: str, replacements: dict[str, str], teacher: str) -> str:
    for old, new in replacements.items():
        assert source.count(old) == 1, f"{old!r} must occur exactly once in the TRL script"
        source = source.replace(old, new.format(teacher=repr(teacher)))
    return source


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Tiny student and teacher saved like Hub checkpoints (model + tokenizer), and the data as JSON lines."""
    root = tmp_path_factory.mktemp("drop_in")
    tokenizer = addition.make_tokenizer()
    for name, (width, layers, heads, seed) in {"student": (32, 1, 2, 2), "teacher": (64, 2, 4, 1)}.items():
        tiny_causal_lm(tokenizer, hidden_size=width, num_layers=layers, num_heads=heads, seed=seed).save_pretrained(
            root / name
        )
        tokenizer.save_pretrained(root / name)
    problems, _ = addition.make_splits(seed=0, n_train=MAX_STEPS * BATCH, n_eval=4)
    for name, dataset in {
        "sft": addition.sft_dataset(problems).remove_columns("answer"),
        "dpo": addition.preference_dataset(problems).remove_columns("answer"),
    }.items():
        with open(root / f"{name}.jsonl", "w") as f:
            for row in dataset:
                f.write(json.dumps(row) + "\n")
    return root


def _argv(script: str, assets: Path, output_dir: Path) -> list[str]:
    data = assets / ("dpo.jsonl" if script == "dpo.py" else "sft.jsonl")
    models = [assets / "student", assets / "teacher"] if script == "gkd.py" else [assets / "student"]
    return [script, *map(str, models), str(data), str(output_dir)]


def _run(path: Path, argv: list[str], monkeypatch) -> dict:
    """Run a script file as `python path argv...` would, here; returns its globals (the trainer among them)."""
    with monkeypatch.context() as patch:
        patch.setattr(sys, "argv", argv)
        return runpy.run_path(str(path), run_name="__main__")


_TRL_RUNS: dict[str, dict] = {}


@pytest.fixture
def trl_run(assets, tmp_path_factory, monkeypatch):
    """The TRL script run as it is, once per script for the whole module."""

    def run(script: str) -> dict:
        if script not in _TRL_RUNS:
            out = tmp_path_factory.mktemp(f"trl_{Path(script).stem}") / "out"
            _TRL_RUNS[script] = _run(SCRIPTS / script, _argv(script, assets, out), monkeypatch)
        return _TRL_RUNS[script]

    return run


def _expected_learning_rates() -> list[float]:
    """The learning rate each logged optimizer step used, under the scripts' schedule (transformers' own cosine)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LEARNING_RATE)
    scheduler = get_cosine_schedule_with_warmup(optimizer, WARMUP_STEPS, MAX_STEPS)
    rates = []
    for step in range(1, MAX_STEPS + 1):
        if step % LOGGING_STEPS == 0:
            rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def _schedule(trainer) -> tuple[list[int], list[float]]:
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [entry["step"] for entry in logged], [entry["learning_rate"] for entry in logged]


def _check_trl_fields(trainer) -> None:
    assert trainer.state.global_step == trainer.state.max_steps == MAX_STEPS
    assert trainer.state.train_batch_size == BATCH
    steps, rates = _schedule(trainer)
    assert steps == list(range(LOGGING_STEPS, MAX_STEPS + 1, LOGGING_STEPS))
    torch.testing.assert_close(rates, _expected_learning_rates(), rtol=1e-6, atol=1e-12)
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


def _check_saved_model(trainer, output_dir: Path, base_dir: Path) -> None:
    """`save_model()` wrote the trained weights to `output_dir`, loadable the usual way."""
    assert AutoTokenizer.from_pretrained(output_dir).get_vocab() == trainer.processing_class.get_vocab()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if isinstance(trained, PeftModel):
        assert (output_dir / "adapter_config.json").exists() and not (output_dir / "model.safetensors").exists()
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), output_dir)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(output_dir)
    want = {k: v for k, v in trained.state_dict().items() if "lora_" in k or not isinstance(trained, PeftModel)}
    got = loaded.state_dict()
    assert want, "no trained weights to compare"
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, msg=name)
    # ... and they are not the weights training started from (a fresh LoRA's B is zero: compare the merged model).
    start = AutoModelForCausalLM.from_pretrained(base_dir).state_dict()
    final = (loaded.merge_and_unload() if isinstance(loaded, PeftModel) else loaded).state_dict()
    assert any(not torch.equal(final[k], start[k]) for k in start), "save_model() wrote the initial weights"


@pytest.mark.parametrize("trainer_name", list(SWAPS))
def test_trl_script_runs_with_only_the_import_and_class_names_swapped(
    trainer_name, assets, trl_run, tmp_path, monkeypatch
):
    script, replacements = SWAPS[trainer_name]
    original = (SCRIPTS / script).read_text()
    swapped = swap(original, replacements, teacher=str(assets / "teacher"))

    # Only the import line, the config call and the trainer call differ (and the teacher argument is added).
    diff = list(difflib.ndiff(original.splitlines(), swapped.splitlines()))
    removed = [line[2:] for line in diff if line.startswith("- ")]
    added = [line[2:] for line in diff if line.startswith("+ ")]
    assert len(removed) == 3, removed
    assert all("trl_distill" in line or trainer_name in line or "Config(" in line or "teacher_model=" in line
               for line in added), added

    path = tmp_path / script
    path.write_text(swapped)
    output_dir = tmp_path / "out"
    ours = _run(path, _argv(script, assets, output_dir), monkeypatch)["trainer"]
    trl = trl_run(script)["trainer"]

    assert type(ours).__name__ == trainer_name
    new_config_call = next(new for old, new in replacements.items() if old.endswith("Config("))
    assert f"{type(ours.args).__name__}(" == new_config_call
    for trainer in (trl, ours):
        _check_trl_fields(trainer)
    assert _schedule(ours) == _schedule(trl)
    _check_saved_model(ours, output_dir, assets / "student")
    if trainer_name == "OKDTrainer":  # and the online teacher adapter beside the student
        assert (output_dir / "teacher_adapter" / "adapter_config.json").exists()


@pytest.mark.parametrize("script", ["sft.py", "gkd.py", "dpo.py"])
def test_trl_originals_save_their_model(script, assets, trl_run):
    """The TRL scripts themselves run and save (so the swap is what the other test measures)."""
    trainer = trl_run(script)["trainer"]
    _check_saved_model(trainer, Path(trainer.args.output_dir), assets / "student")
