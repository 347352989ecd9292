"""GKDVariant's on-policy sampling: TRL DistillationConfig's generation fields, completion logging, and the vLLM
wiring, tested against a stand-in at TRL's `VLLMGeneration` boundary (vLLM itself needs a GPU and is not installed
here; benchmarks/gpu_check.py runs the real path where `vllm` imports)."""

import dataclasses
import importlib

import pandas as pd
import pytest
import torch
from trl import DistillationConfig

from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import sft_dataset
from trl_distill.trainers._generation import OnPolicyGenerationArguments

from .conftest import cpu_args


def _trainer(tmp_path, student, teacher, tokenizer, problems, **config):
    config = {**cpu_args(per_device_train_batch_size=4), "lmbda": 1.0, "max_new_tokens": 5, **config}
    return GKDVariant(
        model=student,
        teacher_model=teacher,
        args=GKDVariantConfig(output_dir=str(tmp_path / "out"), **config),
        train_dataset=sft_dataset(problems, format="messages"),
        processing_class=tokenizer,
    )


def test_generation_fields_have_trl_distillation_names_and_defaults():
    ours = {f.name: f.default for f in dataclasses.fields(OnPolicyGenerationArguments)}
    trl = {f.name: f.default for f in dataclasses.fields(DistillationConfig)}
    assert {"top_p", "top_k", "min_p", "repetition_penalty", "generation_kwargs", "cache_implementation",
            "log_completions", "use_vllm", "vllm_mode"} <= set(ours)
    for name, default in ours.items():
        assert name in trl and trl[name] == default, name
    assert {f.name for f in dataclasses.fields(GKDVariantConfig)} >= set(ours)


@pytest.mark.parametrize(
    "field, value, message",
    [("top_p", 0.0, "top_p must be in"), ("top_k", -1, "top_k must be >= 0"), ("min_p", 1.5, "min_p must be in"),
     ("repetition_penalty", 0.0, "repetition_penalty must be > 0"), ("vllm_mode", "remote", "vllm_mode must be one")],
)
def test_bad_generation_fields_are_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=f"GKDVariantConfig.{message}"):
        GKDVariantConfig(output_dir=str(tmp_path), **cpu_args(), **{field: value})


def test_generation_config_used_carries_the_fields(tmp_path, student, teacher, tokenizer, problems, monkeypatch):
    trainer = _trainer(
        tmp_path, student, teacher, tokenizer, problems, top_p=0.8, top_k=7, min_p=0.05, repetition_penalty=1.3,
        generation_kwargs='{"no_repeat_ngram_size": 2, "top_k": 9}',  # a JSON string, as from the command line
        cache_implementation="dynamic", max_steps=1,
    )
    used = []
    generate = trainer.model.generate

    def recording_generate(*args, generation_config=None, **kwargs):
        used.append(generation_config)
        return generate(*args, generation_config=generation_config, **kwargs)

    monkeypatch.setattr(trainer.model, "generate", recording_generate)
    trainer.train()
    assert len(used) == 1
    config = used[0]
    assert (config.top_p, config.min_p, config.repetition_penalty) == (0.8, 0.05, 1.3)
    assert config.top_k == 9 and config.no_repeat_ngram_size == 2  # generation_kwargs override the fields
    assert config.cache_implementation == "dynamic" and config.use_cache and config.do_sample
    assert config.temperature == 0.9 and config.max_new_tokens == 5  # GKDConfig's sampling temperature
    assert config.eos_token_id == tokenizer.eos_token_id


def test_log_completions_writes_the_sampled_pairs(tmp_path, student, teacher, tokenizer, problems):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, problems, log_completions=True, max_steps=2)
    trainer.train()
    for step in (1, 2):
        table = pd.read_parquet(tmp_path / "out" / "completions" / f"completions_{step:05d}.parquet")
        assert list(table.columns) == ["step", "prompt", "completion"] and len(table) == 4
        assert (table["step"] == step).all() and table["prompt"].str.contains(r"\+").all()  # "a+b=" prompts


# ------------------------------------------------------------------------------------------------ vLLM wiring


class StandInVLLMGeneration:
    """Records what GKDVariant hands TRL's `VLLMGeneration` and returns fixed completions (no vLLM engine)."""

    instances = []

    def __init__(self, model, accelerator, processing_class, **settings):
        self.model, self.settings = model, settings
        self.prompts, self.syncs = [], []
        eos = processing_class.eos_token_id
        digits = processing_class.convert_tokens_to_ids(list("0123456789"))
        # varied lengths, one without EOS (cut at max_completion_length), one with tokens after EOS
        self.completions = [digits[:3] + [eos], digits[3:4] + [eos, digits[5]], digits[:5], [eos]]
        StandInVLLMGeneration.instances.append(self)

    def sync_weights(self):
        self.syncs.append(sum(p.detach().double().sum().item() for p in self.model.parameters()))

    def generate(self, prompts, images, num_generations):
        assert images is None and num_generations == 1
        self.prompts.append(prompts)
        return prompts, [self.completions[i % 4] for i in range(len(prompts))], None, None


@pytest.fixture
def stand_in_vllm(monkeypatch):
    StandInVLLMGeneration.instances = []
    # the module first (it imports vllm's client when vllm is reported available), then the availability check
    monkeypatch.setattr(importlib.import_module("trl.generation.vllm_generation"), "VLLMGeneration",
                        StandInVLLMGeneration)
    monkeypatch.setattr(importlib.import_module("trl.import_utils"), "is_vllm_available", lambda: True)
    return StandInVLLMGeneration


def test_use_vllm_without_vllm_is_a_clear_error(tmp_path, student, teacher, tokenizer, problems):
    with pytest.raises(ImportError, match="use_vllm=True needs vLLM"):
        _trainer(tmp_path, student, teacher, tokenizer, problems, use_vllm=True)


def test_vllm_gets_the_settings_prompts_and_synced_weights(
    tmp_path, student, teacher, tokenizer, problems, stand_in_vllm
):
    trainer = _trainer(
        tmp_path, student, teacher, tokenizer, problems, use_vllm=True, vllm_mode="server", vllm_server_port=8123,
        top_p=0.9, top_k=4, min_p=0.1, repetition_penalty=1.1, generation_kwargs={"seed": 3},
        max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-2,
    )
    (engine,) = stand_in_vllm.instances
    assert engine.model is trainer.model
    expected = dict(mode="server", server_port=8123, temperature=0.9, top_p=0.9, top_k=4, min_p=0.1,
                    repetition_penalty=1.1, max_completion_length=5, generation_kwargs={"seed": 3},
                    gpu_memory_utilization=0.3, max_num_seqs=4 * 2, logprobs=None)
    assert {k: engine.settings[k] for k in expected} == expected
    trainer.train()

    # one generation per micro-batch, the batch's prompts unpadded, as the chat template writes them
    assert len(engine.prompts) == 3 * 2 and all(len(p) == 4 for p in engine.prompts)
    prompt_ids = {
        tuple(tokenizer.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                            return_dict=False))
        for row in trainer.train_dataset
    }
    assert all(tuple(p) in prompt_ids for batch in engine.prompts for p in batch)
    # weights pushed once per optimizer step (not per micro-batch), each time the updated ones
    assert len(engine.syncs) == 3 and len(set(engine.syncs)) == 3
    assert trainer.state.log_history[0]["on_policy_fraction"] == 1.0


def test_vllm_completions_become_the_same_inputs_as_hf_generated_ones(
    tmp_path, student, teacher, tokenizer, problems, stand_in_vllm, monkeypatch
):
    trainer = _trainer(tmp_path, student, teacher, tokenizer, problems, use_vllm=True)
    (engine,) = stand_in_vllm.instances
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    vllm_ids, vllm_mask, vllm_labels = trainer._sample(trainer.model, batch, on_policy=True)

    # HF path: the student's `generate` returns the same completions, padded as `generate` pads them
    width = max(len(c) for c in engine.completions)
    padded = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in engine.completions])
    sequences = torch.cat([batch["prompts"], padded], dim=1)
    monkeypatch.setattr(trainer.model, "generate", lambda **_: type("Out", (), {"sequences": sequences})())
    trainer.vllm_generation = None
    hf_ids, hf_mask, hf_labels = trainer._sample(trainer.model, batch, on_policy=True)

    assert torch.equal(vllm_ids, hf_ids) and torch.equal(vllm_mask, hf_mask) and torch.equal(vllm_labels, hf_labels)
    # completion tokens after the first EOS are masked out; the prompt is never a label
    assert (vllm_labels[:, : batch["prompts"].shape[1]] == -100).all()
    assert (vllm_labels[1] != -100).sum() == 2 and (vllm_labels[2] != -100).sum() == 5
    with torch.no_grad():
        inputs = {**batch, "input_ids": vllm_ids, "attention_mask": vllm_mask, "labels": vllm_labels}
        assert torch.isfinite(trainer.compute_loss(trainer.model, inputs))
