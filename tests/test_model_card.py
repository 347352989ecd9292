"""Model cards: every trainer names its method and paper, with the trl and trl-distill tags."""

import fnmatch
from pathlib import Path
from types import SimpleNamespace

import pytest

import trl_distill
from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import sft_dataset

from trl_distill.testing import tiny_causal_lm

from .conftest import cpu_args
from .factories import TRAINERS, build

PAPERS = {
    "GKDVariant": "2306.13649",
    "OKDTrainer": "2409.12512",
    "DistillDPOTrainer": "2502.17927",
    "ADPOTrainer": "2510.18913",
    "REDITrainer": "2505.24850",
}


@pytest.mark.parametrize("trainer_name, paper_id", sorted(PAPERS.items()))
def test_each_trainer_cites_its_own_paper_and_tags(trainer_name, paper_id):
    trainer_class = getattr(trl_distill, trainer_name)
    assert trainer_class._paper["id"] == paper_id
    assert trainer_class._paper["title"] in trainer_class._paper["citation"]
    assert {"trl", "trl-distill"} <= set(trainer_class._tag_names)


def test_saved_card_names_method_tags_and_citation(tmp_path, student, teacher, tokenizer, problems):
    trainer = GKDVariant(
        model=student,
        teacher_model=teacher,
        args=GKDVariantConfig(output_dir=str(tmp_path), lmbda=0.0, **cpu_args(max_steps=1)),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
    )
    trainer.train()
    trainer.create_model_card(model_name="tiny-student", dataset_name="addition")
    card = (tmp_path / "README.md").read_text()
    for expected in ("GKDVariant", "trl-distill", "gkd", "2306.13649", "addition"):
        assert expected in card, expected


# The card of each trainer: the method and its paper, the teacher (REDI has none: it learns from the dataset's traces),
# the fields the method adds, the results and the citations.
CARD_EXPECTATIONS = {
    "gkd": ("GKDVariant", "2306.13649", "| lmbda | 0 |", "| loss_type | jsd |", "LlamaForCausalLM"),
    "okd": ("OKDTrainer", "2409.12512", "| alpha | 0.1 |", "| teacher_update | online |", "LlamaForCausalLM"),
    "distill-dpo": ("DistillDPOTrainer", "2502.17927", "| mode | teacher_ref |", "| beta | 0.1 |", "LlamaForCausalLM"),
    "adpo": ("ADPOTrainer", "2510.18913", "| anchor | teacher |", "| tau | 1 |", "LlamaForCausalLM"),
    "redi": ("REDITrainer", "2505.24850", "| alpha | 0.8 |", "none (learns from the dataset's traces)"),
}


@pytest.mark.parametrize("name", TRAINERS)
def test_card_after_training_names_method_teacher_hyperparameters_results(name, tmp_path, tokenizer, student, teacher, problems):
    trainer = build(name, tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, problems=problems, max_steps=1)
    trainer.train()
    trainer.create_model_card(model_name="tiny-student", dataset_name="addition")
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    for tag in ("trl", "trl-distill", "distillation", *type(trainer)._tag_names):
        assert f"- {tag}\n" in header, tag
    for section in ("## Distillation set-up", "## Hyperparameters", "## Training results", "## Citations"):
        assert section in card, section
    for expected in CARD_EXPECTATIONS[name]:
        assert expected in card, expected
    assert "| train_loss |" in card and "@software{vonwerra2020trl" in card
    assert type(trainer)._paper["citation"].splitlines()[0] in card


def test_card_names_a_hub_base_model_and_a_peft_student(tmp_path, tokenizer, teacher, problems):
    from peft import LoraConfig, get_peft_model

    student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    student.config._name_or_path = "org/tiny-student-base"
    lora = get_peft_model(student, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainer = build("gkd", tmp_path, tokenizer=tokenizer, student=lora, teacher=teacher, problems=problems, max_steps=1)
    trainer.train()
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "base_model: org/tiny-student-base" in card and "library_name: peft" in card
    assert "| student peft r | 4 |" in card and "| student base model | org/tiny-student-base |" in card


class _RecordingHubApi:
    """Stands in for huggingface_hub's HfApi at the network boundary: records what would be sent."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return SimpleNamespace(repo_id=f"user/{repo_id}")

    def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
        uploaded = {}
        for path in Path(folder_path).rglob("*"):
            relative = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, p) for p in ignore_patterns):
                uploaded[relative] = path.read_bytes()
        self.uploads.append((repo_id, uploaded))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0")


def test_push_to_hub_uploads_model_and_card(tmp_path, tokenizer, student, teacher, problems, monkeypatch):
    """The whole push path runs; only the two network calls (create_repo, upload_folder) are recorded instead."""
    import transformers.trainer

    api = _RecordingHubApi()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: api)
    trainer = build(
        "okd", tmp_path / "tiny-okd", tokenizer=tokenizer, student=student, teacher=teacher, problems=problems,
        max_steps=1, push_to_hub=True, hub_strategy="end",
    )
    trainer.train()
    trainer.push_to_hub(dataset_name="addition")

    assert api.repos == ["tiny-okd"]
    repo_id, files = api.uploads[-1]
    assert repo_id == "user/tiny-okd"
    assert {"README.md", "config.json", "model.safetensors", "teacher_adapter/adapter_model.safetensors"} <= set(files)
    assert not any(name.startswith(("checkpoint-", "_")) for name in files)
    card = files["README.md"].decode()
    assert "OKDTrainer" in card and "datasets: addition" in card and "user/tiny-okd" in card


def test_card_is_trls_with_tracker_links_tags_and_our_sections(tmp_path, student, teacher, tokenizer, problems,
                                                                monkeypatch):
    """Built on TRL's `generate_model_card`: its template, `generated_from_trainer` tag and tracker links."""
    import trl.trainer.utils

    monkeypatch.setattr(trl.trainer.utils, "get_trackio_space_url", lambda: "https://huggingface.co/spaces/u/runs")
    monkeypatch.setattr(trl.trainer.utils, "get_comet_experiment_url", lambda: "https://www.comet.com/u/p/e1")
    trainer = build("gkd", tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, problems=problems,
                    max_steps=1)
    trainer.train()
    trainer.create_model_card(model_name="tiny-student", dataset_name="addition", tags=["mine"])
    card = (tmp_path / "README.md").read_text()
    header = card.split("---")[1]
    for tag in ("generated_from_trainer", "mine", "trackio:https://huggingface.co/spaces/u/runs", "distillation"):
        assert f"- {tag}\n" in header, tag
    assert "](https://huggingface.co/spaces/u/runs)" in card and "](https://www.comet.com/u/p/e1)" in card
    assert "## Training procedure" in card and "This model was trained with GKDVariant" in card
    assert f"- trl-distill: {trl_distill.__version__}" in card and "- TRL: " in card
    assert "huggingface.co/None" not in card  # a local student: no broken base-model link
    assert card.index("## Distillation set-up") < card.index("## Training results") < card.index("## Citations")
