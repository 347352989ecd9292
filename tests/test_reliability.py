"""What every trainer shares (trl_distill/trainers/_common.py): a guarded output_dir, resume from the last complete
checkpoint, atomic saves, non-finite losses (raise naming the step and term, or skip the batch), and divergences in
float32 under half precision."""

import glob
import os
import re

import pytest
import torch
from transformers import TrainerCallback

from trl_distill import losses
from trl_distill.trainers import _common

from .factories import TRAINERS, build


@pytest.fixture
def make(tokenizer, student, teacher, problems):
    def _make(name, output_dir, **overrides):
        return build(
            name, output_dir, tokenizer=tokenizer, student=student, teacher=teacher, problems=problems, **overrides
        )

    return _make


def _snapshot(folder):
    """Every file under `folder` with its bytes."""
    files = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = f.read()
    return files


def _leftovers(folder):
    return glob.glob(os.path.join(folder, "**", _common.STAGING_PREFIX + "*"), recursive=True)


# ---------------------------------------------------------------------------------------------- output_dir
@pytest.mark.parametrize("name", TRAINERS)
def test_fresh_run_refuses_a_saved_model_and_leaves_it_untouched(make, tmp_path, name):
    make(name, tmp_path).save_model()
    saved = _snapshot(tmp_path)
    assert "model.safetensors" in saved and "config.json" in saved

    trainer = make(name, tmp_path)
    with pytest.raises(FileExistsError, match=r"output_dir .* already holds a saved run \(config\.json"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert _snapshot(tmp_path) == saved


def test_overwrite_output_dir_allows_a_fresh_run(make, tmp_path):
    make("gkd", tmp_path).save_model()
    trainer = make("gkd", tmp_path, overwrite_output_dir=True, max_steps=1)
    trainer.train()
    assert trainer.state.global_step == 1


def test_checkpoints_count_as_a_saved_run(make, tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(FileExistsError, match="checkpoint-2"):
        make("redi", tmp_path).train()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        make("redi", tmp_path).train(resume_from_checkpoint=True)


def test_resume_skips_a_checkpoint_whose_save_was_interrupted(make, tmp_path):
    make("gkd", tmp_path, max_steps=3, save_strategy="steps", save_steps=1).train()
    # A kill while checkpoint-3 was being written: transformers writes trainer_state.json last.
    os.remove(tmp_path / "checkpoint-3" / "trainer_state.json")
    assert _common.last_complete_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")

    with pytest.raises(ValueError, match="not a complete checkpoint.*checkpoint-2"):
        make("gkd", tmp_path, max_steps=4).train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    resumed = make("gkd", tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    steps = [entry["step"] for entry in resumed.state.log_history if "loss" in entry]
    assert steps[-2:] == [3, 4]
    assert resumed.state.global_step == 4


# ---------------------------------------------------------------------------------------------- atomic saves
def test_move_into_replaces_files_and_swaps_folders(tmp_path):
    target, staging = tmp_path / "out", tmp_path / "staging"
    (target / "adapter").mkdir(parents=True)
    (target / "adapter" / "old.bin").write_text("old")
    (target / "weights").write_text("old")
    (target / "kept").write_text("kept")
    (staging / "adapter").mkdir(parents=True)
    (staging / "adapter" / "new.bin").write_text("new")
    (staging / "weights").write_text("new")
    _common.move_into(str(staging), str(target))
    assert sorted(os.listdir(target)) == ["adapter", "kept", "weights"]
    assert os.listdir(target / "adapter") == ["new.bin"]  # the folder is replaced whole, not merged
    assert (target / "weights").read_text() == "new" and (target / "kept").read_text() == "kept"
    assert os.listdir(staging) == []


def test_a_save_that_fails_midway_leaves_the_previous_files(make, tmp_path, monkeypatch):
    trainer = make("okd", tmp_path)
    trainer.save_model()
    before = _snapshot(tmp_path)
    assert "teacher_adapter/adapter_model.safetensors" in before
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(1.0)

    # The model weights are already written (to the staging folder) when the tokenizer save fails.
    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer.processing_class, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_model()
    assert _snapshot(tmp_path) == before
    assert _leftovers(tmp_path) == []

    monkeypatch.undo()
    trainer.save_model()
    after = _snapshot(tmp_path)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert set(after) == set(before)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------- non-finite losses
EXPECTED_TERM = {
    "gkd": "student hidden states",
    "okd": "student hidden states",
    "distill-dpo": "dpo_loss",
    "adpo": "policy log-probs",
    "redi": "chosen log-probs",
}


def _poison_first_forward(model):
    """NaN in the student's embeddings on its first forward only: one bad batch."""
    calls = []

    def hook(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) == 1 else output

    return model.get_input_embeddings().register_forward_hook(hook)


@pytest.mark.parametrize("name", TRAINERS)
def test_nonfinite_loss_names_step_and_term(make, tmp_path, name):
    trainer = make(name, tmp_path)
    _poison_first_forward(trainer.model)
    with pytest.raises(FloatingPointError, match=rf"{type(trainer).__name__}: non-finite {EXPECTED_TERM[name]} at step 1 "):
        trainer.train()


def test_nonfinite_teacher_is_named(make, tmp_path, teacher):
    trainer = make("gkd", tmp_path)
    _poison_first_forward(teacher)
    with pytest.raises(FloatingPointError, match="non-finite teacher hidden states at step 1"):
        trainer.train()


@pytest.mark.parametrize("name", TRAINERS)
def test_skip_gives_the_bad_batch_zero_gradients_and_trains_on(make, tmp_path, name):
    trainer = make(name, tmp_path, on_nonfinite="skip", max_steps=2)
    trainable = lambda: {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}  # noqa: E731
    initial = trainable()
    _poison_first_forward(trainer.model)
    after_first = {}

    class AfterStep(TrainerCallback):  # the weights right after the skipped step
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_first.update(trainable())
                if name == "okd":
                    after_first["teacher"] = [p.detach().clone() for _, p in trainer.teacher_parameters]

    okd_teacher_before = [p.detach().clone() for _, p in trainer.teacher_parameters] if name == "okd" else None
    trainer.add_callback(AfterStep())
    trainer.train()

    skipped = [entry["nonfinite_skipped"] for entry in trainer.state.log_history if "nonfinite_skipped" in entry]
    assert skipped == [1.0, 0.0]
    for n, value in initial.items():  # the skipped step changed nothing (AdamW on zero gradients, no decay)
        torch.testing.assert_close(after_first[n], value, rtol=0, atol=0)
    if name == "okd":
        for before, after in zip(okd_teacher_before, after_first["teacher"]):
            torch.testing.assert_close(after, before, rtol=0, atol=0)
    final = trainable()
    assert all(torch.isfinite(p).all() for p in final.values())
    assert any(not torch.equal(final[n], initial[n]) for n in initial)  # the second, clean batch trained


def _poison_first_backward(named_parameters):
    """NaN in the gradient of the first trainable parameter, on the first backward only: the loss stays finite."""
    name, param = next((n, p) for n, p in named_parameters if p.requires_grad)
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == 1 else grad

    param.register_hook(hook)
    return name


@pytest.mark.parametrize("name", TRAINERS)
def test_nonfinite_gradient_behind_a_finite_loss_names_step_and_parameter(make, tmp_path, name):
    trainer = make(name, tmp_path)
    parameter = _poison_first_backward(trainer.model.named_parameters())
    message = rf"{type(trainer).__name__}: non-finite gradient at step 1 with a finite loss, in {re.escape(parameter)}"
    with pytest.raises(FloatingPointError, match=message):
        trainer.train()


def test_nonfinite_gradient_of_the_okd_teacher_adapter_is_named(make, tmp_path):
    trainer = make("okd", tmp_path)
    parameter = _poison_first_backward(trainer.teacher_parameters)
    with pytest.raises(FloatingPointError, match=rf"non-finite gradient at step 1 .* in teacher {re.escape(parameter)}"):
        trainer.train()


@pytest.mark.parametrize("name", TRAINERS)
def test_skip_drops_the_optimizer_step_of_a_nonfinite_gradient(make, tmp_path, name):
    trainer = make(name, tmp_path, on_nonfinite="skip", max_steps=2)
    snapshot = lambda: [p.detach().clone() for p in trainer.model.parameters()] + [  # noqa: E731
        p.detach().clone() for p in trainer._extra_trainable_parameters()]
    initial = snapshot()
    _poison_first_backward(trainer.model.named_parameters())
    if name == "okd":  # and the teacher adapter's, in the same step
        _poison_first_backward(trainer.teacher_parameters)
    after_first = []

    class AfterStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                after_first.extend(snapshot())

    trainer.add_callback(AfterStep())
    trainer.train()

    skipped = [e["nonfinite_grad_skipped"] for e in trainer.state.log_history if "nonfinite_grad_skipped" in e]
    assert skipped == [1.0, 0.0]
    for before, after in zip(initial, after_first, strict=True):  # nothing moved: no optimizer saw a gradient
        torch.testing.assert_close(after, before, rtol=0, atol=0)
    final = snapshot()
    assert all(torch.isfinite(p).all() for p in final)
    assert any(not torch.equal(a, b) for a, b in zip(final, initial))  # the second step trained


def test_on_nonfinite_is_validated(tmp_path):
    from trl_distill import GKDVariantConfig

    with pytest.raises(ValueError, match="GKDVariantConfig.on_nonfinite='ignore'"):
        GKDVariantConfig(output_dir=str(tmp_path), on_nonfinite="ignore")


# ---------------------------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("loss_type", losses.LOSS_TYPES)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_divergences_run_in_float32_under_autocast(loss_type, half):
    generator = torch.Generator().manual_seed(0)
    student = (torch.randn(3, 5, 40, generator=generator) * 4).to(half)
    teacher = (torch.randn(3, 5, 40, generator=generator) * 4).to(half)
    reference = losses.divergence(loss_type, student.float(), teacher.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = losses.divergence(loss_type, student, teacher)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7)


def test_bf16_training_computes_log_probs_in_float32(make, tmp_path, monkeypatch):
    """GKDVariant and OKD under CPU bf16 autocast (fp16=True on CPU runs in float32: accelerate autocasts fp16 only
    on accelerators, so fp16 is covered at the loss level above)."""
    seen = []
    original = losses._log_softmax

    def spy(logits, temperature):
        out = original(logits, temperature)
        seen.append((logits.dtype, out.dtype))
        return out

    monkeypatch.setattr(losses, "_log_softmax", spy)
    for name in ("gkd", "okd"):
        trainer = make(name, tmp_path / name, use_cpu=True, max_steps=1, bf16=True)
        trainer.train()
        assert torch.isfinite(torch.tensor(trainer.state.log_history[0]["loss"]))
    assert any(dtype == torch.bfloat16 for dtype, _ in seen)  # the logits really were half precision
    assert {out for _, out in seen} == {torch.float32}


def test_chunked_loss_under_bf16_autocast_keeps_dtypes_and_values():
    """The chunked path under autocast: the projection runs in bf16 (as a model's own head would), the divergence and
    the gradients it returns stay in the inputs' float32."""
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(2, 6, 16, generator=generator, requires_grad=True)
    student_weight = torch.randn(40, 16, generator=generator, requires_grad=True)
    teacher_hidden, teacher_weight = torch.randn(2, 6, 24, generator=generator), torch.randn(40, 24, generator=generator)
    inputs = (student_hidden, student_weight, teacher_hidden, teacher_weight)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # a prompt: masked rows take the row-gather path
    reference = losses.chunked_divergence("jsd", *inputs, mask=mask, chunk_size=4)
    reference_grads = torch.autograd.grad(reference, (student_hidden, student_weight))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = losses.chunked_divergence("jsd", *inputs, mask=mask, chunk_size=4)
    grads = torch.autograd.grad(value, (student_hidden, student_weight))
    assert value.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(value, reference, rtol=0.05, atol=0.05)  # bf16 logits: ~3 significant digits
    for grad, expected in zip(grads, reference_grads):
        torch.testing.assert_close(grad, expected, rtol=0.1, atol=0.02)
