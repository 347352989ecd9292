"""Offline teacher (issue 16): scoring a dataset once (`score_dataset`, `trl-distill teacher-topk`), resuming, and
training GKDVariant from the stored top-k with teacher_model=None: same losses and gradients as the live teacher."""

import copy
import json
import os

import pytest
import torch

from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import sft_dataset
from trl_distill.offline_teacher import (
    METADATA_FILE,
    TEACHER_COLUMNS,
    load_teacher_topk,
    score_dataset,
    stored_teacher_info,
    storage_bytes_per_token,
    tokenizer_fingerprint,
)

from .conftest import cpu_args

TOP_K = 6
MAX_LENGTH = 11  # shorter than half the rows (11-12 tokens): scoring and training truncate alike


@pytest.fixture
def data(problems):
    return sft_dataset(problems[:20], format="messages")


@pytest.fixture
def scored(tmp_path, teacher, tokenizer, data):
    return score_dataset(teacher, tokenizer, data, tmp_path / "scores", top_k=TOP_K, temperature=1.5,
                         max_length=MAX_LENGTH, batch_size=3, shard_size=8, progress=False)


def _variant(tmp_path, student, teacher, tokenizer, dataset, name, **config):
    config = {**cpu_args(), "lmbda": 0.0, "loss_type": "forward_kl", "teacher_top_k": TOP_K,
              "loss_temperature": 1.5, "max_length": MAX_LENGTH, **config}
    return GKDVariant(model=student, teacher_model=teacher,
                      args=GKDVariantConfig(output_dir=str(tmp_path / name), **config),
                      train_dataset=dataset, processing_class=tokenizer)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(37))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_scored_dataset_columns_metadata_and_shards(tmp_path, scored, tokenizer, data):
    assert len(scored) == len(data) and scored["messages"] == data["messages"]
    info = stored_teacher_info(scored)
    assert (info.top_k, info.temperature, info.max_length, info.num_rows) == (TOP_K, 1.5, MAX_LENGTH, len(data))
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer)
    assert sorted(os.listdir(tmp_path / "scores" / "shards")) == ["shard-00000", "shard-00001", "shard-00002"]
    row = scored[0]
    n = len(row["teacher_token_ids"])
    assert n > 0 and len(row["teacher_topk_ids"]) == n and len(row["teacher_rest_logprobs"]) == n
    assert all(len(ids) == TOP_K for ids in row["teacher_topk_ids"])
    logprobs = torch.tensor(row["teacher_topk_logprobs"])
    total = torch.logaddexp(logprobs.logsumexp(-1), torch.tensor(row["teacher_rest_logprobs"]))
    torch.testing.assert_close(total, torch.zeros(n), atol=1e-5, rtol=0)  # top-k + rest = the whole mass
    assert storage_bytes_per_token(TOP_K) == 8 * TOP_K + 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk_size", [5, None])
def test_stored_teacher_gives_the_live_teachers_losses_and_grads(tmp_path, student, teacher, tokenizer, data, dtype,
                                                                  chunk_size):
    student, teacher = student.to(dtype), teacher.to(dtype)
    scored = score_dataset(teacher, tokenizer, data, tmp_path / "scores", top_k=TOP_K, temperature=1.5,
                           max_length=MAX_LENGTH, batch_size=4, shard_size=8, progress=False)
    if dtype == torch.float64:
        assert scored.features["teacher_topk_logprobs"].feature.feature.dtype == "float32"
    live = _variant(tmp_path, copy.deepcopy(student), teacher, tokenizer, data, "live", loss_chunk_size=chunk_size)
    offline = _variant(tmp_path, student, None, tokenizer, scored, "offline", loss_chunk_size=chunk_size)
    assert offline.teacher_model is None
    rows = list(range(8))
    live_batch = live.data_collator([data[i] for i in rows])
    offline_batch = offline.data_collator([scored[i] for i in rows])
    assert torch.equal(live_batch["input_ids"], offline_batch["input_ids"])
    assert live_batch["attention_mask"].sum(1).max() == MAX_LENGTH  # some rows were truncated
    expected, expected_grads = _loss_and_grads(live, live_batch)
    got, got_grads = _loss_and_grads(offline, offline_batch)
    # the stored log-probs are float32: float64 runs agree to float32 precision, float32 runs to rounding
    tolerance = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.double(), expected.double(), **tolerance)
    assert expected_grads.keys() == got_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name].double(), expected_grads[name].double(), **tolerance, msg=name)


def test_fewer_tokens_than_stored_equal_the_live_top_k(tmp_path, student, teacher, tokenizer, data, scored):
    live = _variant(tmp_path, copy.deepcopy(student), teacher, tokenizer, data, "live", teacher_top_k=3)
    offline = _variant(tmp_path, student, None, tokenizer, scored, "offline", teacher_top_k=3)
    expected, _ = _loss_and_grads(live, live.data_collator([data[i] for i in range(6)]))
    got, _ = _loss_and_grads(offline, offline.data_collator([scored[i] for i in range(6)]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_offline_training_runs_and_logs(tmp_path, student, tokenizer, scored):
    trainer = _variant(tmp_path, student, None, tokenizer, scored, "train", max_steps=2,
                       per_device_train_batch_size=4)
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"divergence", "teacher_agreement"} <= logged


@pytest.mark.parametrize("config,field", [
    ({"lmbda": 0.5}, "lmbda"),
    ({"seq_kd": True}, "seq_kd"),
    ({"loss_temperature": 1.0}, "loss_temperature"),
    ({"teacher_top_k": TOP_K + 1}, "teacher_top_k"),
    ({"teacher_top_k": None}, "teacher_top_k"),
    ({"max_length": 32}, "max_length"),
])
def test_mismatching_run_is_refused_naming_the_field(tmp_path, student, tokenizer, scored, config, field):
    with pytest.raises(ValueError, match=field):
        _variant(tmp_path, student, None, tokenizer, scored, "bad", **config)


def test_other_tokenizer_and_unscored_data_are_refused(tmp_path, student, tokenizer, scored, data):
    other = copy.deepcopy(tokenizer)
    other.chat_template = other.chat_template + " "
    with pytest.raises(ValueError, match="tokenizer_fingerprint"):
        _variant(tmp_path, student, None, other, scored, "bad")
    with pytest.raises(ValueError, match="teacher_model"):
        _variant(tmp_path, student, None, tokenizer, data, "bad")
    bare = scored.map(lambda row: row)  # a copy whose metadata was dropped
    bare.info.description = ""
    with pytest.raises(ValueError, match="load_teacher_topk"):
        _variant(tmp_path, student, None, tokenizer, bare, "bad")


def test_misaligned_rows_fail_in_the_collator(tmp_path, student, tokenizer, scored):
    trainer = _variant(tmp_path, student, None, tokenizer, scored, "collate")
    shifted = dict(scored[1], teacher_token_ids=[t + 1 for t in scored[1]["teacher_token_ids"]])
    with pytest.raises(ValueError, match="teacher_token_ids"):
        trainer.data_collator([scored[0], shifted])


def test_resume_scores_only_missing_shards_and_refuses_another_run(tmp_path, teacher, tokenizer, data, scored):
    shards = tmp_path / "scores" / "shards"
    first = (shards / "shard-00000").stat().st_mtime_ns
    import shutil

    shutil.rmtree(shards / "shard-00001")  # as if killed while scoring it
    (shards / "shard-00002.tmp-0").mkdir()  # a half-written shard
    with pytest.raises(ValueError, match="incomplete"):
        load_teacher_topk(tmp_path / "scores")
    again = score_dataset(teacher, tokenizer, data, tmp_path / "scores", top_k=TOP_K, temperature=1.5,
                          max_length=MAX_LENGTH, batch_size=3, shard_size=8, progress=False)
    assert (shards / "shard-00000").stat().st_mtime_ns == first  # not rescored
    assert not (shards / "shard-00002.tmp-0").exists() or (shards / "shard-00002").exists()
    assert again["teacher_topk_logprobs"] == scored["teacher_topk_logprobs"]
    with pytest.raises(ValueError, match="top_k: stored 6, now 4"):
        score_dataset(teacher, tokenizer, data, tmp_path / "scores", top_k=4, temperature=1.5,
                      max_length=MAX_LENGTH, shard_size=8, progress=False)
    assert json.loads((tmp_path / "scores" / METADATA_FILE).read_text())["top_k"] == TOP_K  # untouched


def test_cli_scores_from_yaml_then_trains_gkd_without_teacher(tmp_path, teacher, student, tokenizer):
    from trl_distill import cli

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    config = tmp_path / "topk.yaml"
    config.write_text(f"teacher: {tmp_path / 'teacher'}\ndataset: addition\naddition_num_train: 12\n"
                      f"top_k: 5\nmax_length: 64\noutput_dir: {tmp_path / 'top5'}\n")
    cli.main(["teacher-topk", "--config", str(config), "--shard_size", "5", "--batch_size", "4"])
    stored = load_teacher_topk(tmp_path / "top5")
    assert len(stored) == 12 and stored_teacher_info(stored).top_k == 5
    assert set(TEACHER_COLUMNS) <= set(stored.column_names)
    cli.main(["gkd", "--model_name_or_path", str(tmp_path / "student"), "--dataset_name", str(tmp_path / "top5"),
              "--output_dir", str(tmp_path / "gkd"), "--lmbda", "0", "--teacher_top_k", "5", "--max_length", "64",
              "--max_steps", "1", "--per_device_train_batch_size", "4", "--bf16", "false", "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no", "--use_cpu", "true"])
    assert (tmp_path / "gkd" / "model.safetensors").exists()


def test_benchmark_smoke(tmp_path):
    """benchmarks/offline_teacher.py at tiny size, in this process (the script runs each variant in a fresh one)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import offline_teacher as benchmark

    size = benchmark.SIZES["tiny"]
    storage = benchmark.measure_storage_and_scoring(size, tmp_path)["storage"]
    assert [row["k"] for row in storage] == size["ks"]
    for row in storage:
        assert row["tokens"] > 0 and row["scoring_tokens_per_s"] > 0
        # the Arrow files hold the payload plus a little framing
        assert row["formula_bytes_per_token"] <= row["bytes_per_token"] < 1.5 * row["formula_bytes_per_token"]
    run = benchmark.train_worker(size, tmp_path, "stored")
    assert run["tokens_per_s"] > 0 and run["peak_mib"] >= 0
