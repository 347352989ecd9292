"""Model cards: every trainer names its method and paper, with the trl and trl-distill tags."""

import pytest

import trl_distill
from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import sft_dataset

from .conftest import cpu_args

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
