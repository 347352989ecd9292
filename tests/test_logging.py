"""Metrics reach `report_to` backends under the same names as in `log_history`, consistent across trainers: TRL's
names where TRL has the metric (`loss`, `grad_norm`, `learning_rate`, `num_tokens`, `mean_token_accuracy`,
`logps/*`, ...), and a method prefix or a `teacher_` name for what only trl-distill logs."""

import struct
from pathlib import Path

import pytest
from transformers.trainer_callback import ProgressCallback

from .factories import TRAINERS, build

tensorboardX = pytest.importorskip("tensorboardX")
from tensorboardX.proto import event_pb2  # noqa: E402

COMMON = {"loss", "grad_norm", "learning_rate", "epoch", "num_tokens"}
METHOD = {
    "gkd": {"divergence", "teacher_agreement", "on_policy_fraction"},
    "okd": {"loss/student", "loss/student_ce", "loss/teacher_kd", "loss/teacher_ce", "mean_token_accuracy",
            "teacher_token_accuracy", "teacher_agreement", "teacher_grad_norm", "teacher_learning_rate"},
    "distill-dpo": {"entropy", "logits/chosen", "logits/rejected", "logps/chosen", "logps/rejected",
                    "mean_token_accuracy", "rewards/accuracies", "rewards/chosen", "rewards/margins",
                    "rewards/rejected"},
    "adpo": {"adpo/accuracy", "adpo/logratio", "adpo/loss", "adpo/target_entropy", "anchor_kl", "entropy",
             "logps/completions"},
    "redi": {"entropy", "logps/chosen", "logps/chosen_normalized", "logps/margin", "logps/rejected",
             "logps/rejected_normalized", "mean_token_accuracy"},
}


def _scalar_tags(folder: Path) -> dict[str, list[int]]:
    """Tag -> steps of every scalar in the TensorBoard event files under `folder` (TFRecord framing)."""
    tags: dict[str, list[int]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its crc, payload, payload crc
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.parametrize("name", TRAINERS)
def test_metrics_reach_tensorboard_with_consistent_names(name, tmp_path, tokenizer, student, teacher, problems):
    trainer = build(name, tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, problems=problems,
                    report_to="tensorboard")
    trainer.train()
    logged = {key for entry in trainer.state.log_history[:-1] for key in entry} - {"step"}  # last: the summary
    assert logged == COMMON | METHOD[name]
    tags = _scalar_tags(tmp_path / "runs")
    for key in logged - {"epoch"}:
        assert tags.get(f"train/{key}") == [1, 2], key  # every step reaches the backend, under the same name


def test_progress_bar_as_in_trl(tmp_path, tokenizer, student, teacher, problems):
    trainer = build("gkd", tmp_path, tokenizer=tokenizer, student=student, teacher=teacher, problems=problems,
                    disable_tqdm=False)
    assert any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks)
