"""Offline teacher (issue 16): scoring a dataset once (`score_dataset`, `trl-distill teacher-topk`), resuming, and
training GKDVariant from the stored top-k with teacher_model=None: same losses and gradients as the live teacher."""

import copy
import json
import os

import pytest
import torch

from trl_distill import GKDVariant, GKDVariantConfig
from trl_distill.addition import preference_dataset, sft_dataset
from trl_distill.offline_teacher import (
    METADATA_FILE,
    PREFERENCE_TEACHER_COLUMNS,
    TEACHER_COLUMNS,
    load_teacher_topk,
    score_dataset,
    stored_teacher_info,
    storage_bytes_per_token,
    tokenizer_fingerprint,
)
from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer

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
    overheads = []
    for row in storage:
        assert row["tokens"] > 0 and row["scoring_tokens_per_s"] > 0
        # the files hold the payload (the formula, per token) plus a fixed framing (schema, dataset_info.json)
        overheads.append((row["bytes_per_token"] - row["formula_bytes_per_token"]) * row["tokens"])
    assert all(0 <= overhead < 8192 for overhead in overheads), overheads
    assert max(overheads) - min(overheads) < 64, overheads  # the per-token cost grows with k exactly as 8k + 8
    run = benchmark.train_worker(size, tmp_path, "stored")
    assert run["tokens_per_s"] > 0 and run["peak_mib"] >= 0


# ------------------------------------------------------------------------------------------ DistillDPOTrainer (DCKD)
DPO_MAX_LENGTH = 11  # prompts have 8 tokens, completions 3-4: the 4-token ones are truncated (keep_start)


@pytest.fixture
def pairs(problems):
    return preference_dataset(problems[:12])


@pytest.fixture
def scored_pairs(tmp_path, teacher, tokenizer, pairs):
    return score_dataset(teacher, tokenizer, pairs, tmp_path / "pair_scores", top_k=TOP_K, max_length=DPO_MAX_LENGTH,
                         batch_size=5, shard_size=8, progress=False)


def _dpo(tmp_path, student, teacher, tokenizer, dataset, name, **config):
    config = {**cpu_args(), "mode": "dckd", "teacher_top_k": TOP_K, "max_length": DPO_MAX_LENGTH, **config}
    return DistillDPOTrainer(model=student, teacher_model=teacher,
                             args=DistillDPOConfig(output_dir=str(tmp_path / name), **config),
                             train_dataset=dataset, processing_class=tokenizer)


def _dpo_loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {key: values[-1] for key, values in trainer._metrics["train"].items()}


def test_preference_scoring_stores_both_completions(tmp_path, teacher, tokenizer, pairs, scored_pairs):
    info = stored_teacher_info(scored_pairs)
    assert (info.format, info.truncation_mode, info.max_length, info.top_k) == ("preference", "keep_start",
                                                                                DPO_MAX_LENGTH, TOP_K)
    assert set(PREFERENCE_TEACHER_COLUMNS) <= set(scored_pairs.column_names)
    assert scored_pairs["chosen"] == pairs["chosen"] and scored_pairs["rejected"] == pairs["rejected"]
    lengths = {side: [len(row) for row in scored_pairs[f"{side}_teacher_token_ids"]] for side in ("chosen", "rejected")}
    assert max(lengths["chosen"]) == DPO_MAX_LENGTH - 8 and min(lengths["rejected"]) > 0  # truncated, as in training
    row = scored_pairs[0]
    for side in ("chosen", "rejected"):
        tokens = torch.tensor(row[f"{side}_teacher_token_ids"])
        logprobs = torch.tensor(row[f"{side}_teacher_topk_logprobs"])
        total = torch.logaddexp(logprobs.logsumexp(-1), torch.tensor(row[f"{side}_teacher_rest_logprobs"]))
        torch.testing.assert_close(total, torch.zeros(len(tokens)), atol=1e-5, rtol=0)
        # the stored reference is the teacher's log-prob of the (truncated) completion, computed here by hand
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, return_dict=False)
        ids = torch.tensor([prompt + tokens.tolist()])
        expected = teacher(ids).logits[0, len(prompt) - 1:-1].double().log_softmax(-1).gather(-1, tokens[:, None]).sum()
        torch.testing.assert_close(torch.tensor(row[f"{side}_teacher_logps"]).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("dtype", "dpo_weight", "top_k"), [
    (torch.float32, 0.0, TOP_K), (torch.float64, 0.0, TOP_K), (torch.float32, 0.5, 3), (torch.float64, 0.5, TOP_K),
])
def test_stored_teacher_gives_the_live_dckd_losses_grads_and_metrics(tmp_path, student, teacher, tokenizer, pairs,
                                                                      dtype, dpo_weight, top_k):
    student, teacher = student.to(dtype), teacher.to(dtype)
    scored = score_dataset(teacher, tokenizer, pairs, tmp_path / "scores", top_k=TOP_K, max_length=DPO_MAX_LENGTH,
                           batch_size=5, shard_size=8, progress=False)
    settings = dict(dpo_weight=dpo_weight, teacher_top_k=top_k)
    live = _dpo(tmp_path, copy.deepcopy(student), teacher, tokenizer, pairs, "live", **settings)
    offline = _dpo(tmp_path, student, None, tokenizer, scored, "offline", **settings)
    assert offline.teacher_model is None and offline.ref_model is None
    rows = range(6)
    live_batch = live.data_collator([live.train_dataset[i] for i in rows])
    offline_batch = offline.data_collator([offline.train_dataset[i] for i in rows])
    assert torch.equal(live_batch["input_ids"], offline_batch["input_ids"])
    assert live_batch["attention_mask"].sum(1).max() == DPO_MAX_LENGTH  # some completions were truncated
    expected, expected_grads, expected_metrics = _dpo_loss_and_grads(live, live_batch)
    got, got_grads, got_metrics = _dpo_loss_and_grads(offline, offline_batch)
    # the stored log-probs are float32: float64 runs agree to float32 precision, float32 runs to rounding
    tolerance = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), expected.double(), **tolerance)
    assert expected_grads.keys() == got_grads.keys()
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name].double(), expected_grads[name].double(), **tolerance, msg=name)
    assert {"distill/kl_chosen", "distill/kl_rejected", "distill/sft_loss", "rewards/margins"} <= got_metrics.keys()
    for key, value in expected_metrics.items():
        assert got_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_offline_dckd_trains_without_any_teacher_or_reference_model(tmp_path, student, tokenizer, scored_pairs):
    trainer = _dpo(tmp_path, student, None, tokenizer, scored_pairs, "train", dpo_weight=0.5, max_steps=2,
                   per_device_train_batch_size=4)
    assert trainer.ref_model is None and trainer.teacher_model is None
    trainer.train()
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert {"distill/kl_chosen", "distill/kl_rejected", "distill/dpo_loss", "rewards/accuracies"} <= logged


@pytest.mark.parametrize(("config", "field"), [
    ({"mode": "teacher_ref"}, "mode='teacher_ref'"),
    ({"mode": "adpa"}, "mode='adpa'"),
    ({"adpa_weight": 1.0}, "adpa_weight"),
    ({"ld_alpha": 0.5}, "ld_alpha"),
    ({"teacher_quantization": "4bit"}, "teacher_quantization"),
    ({"teacher_top_k": TOP_K + 1}, "teacher_top_k"),
    ({"max_length": 32}, "max_length"),
    ({"truncation_mode": "keep_end"}, "truncation_mode"),
])
def test_offline_dpo_refuses_what_needs_a_live_teacher_or_mismatches(tmp_path, student, tokenizer, scored_pairs,
                                                                     config, field):
    with pytest.raises(ValueError, match=field):
        _dpo(tmp_path, student, None, tokenizer, scored_pairs, "bad", **config)


def test_offline_dpo_refuses_other_data(tmp_path, student, teacher, tokenizer, pairs, scored, scored_pairs):
    with pytest.raises(ValueError, match="teacher_model"):  # unscored
        _dpo(tmp_path, student, None, tokenizer, pairs, "bad")
    with pytest.raises(ValueError, match="conversations"):  # GKD's stored format
        _dpo(tmp_path, student, None, tokenizer, scored, "bad")
    with pytest.raises(ValueError, match="preference pairs"):  # and the other way round
        _variant(tmp_path, student, None, tokenizer, scored_pairs, "bad")
    hot = score_dataset(teacher, tokenizer, pairs, tmp_path / "hot", top_k=TOP_K, temperature=2.0,
                        max_length=DPO_MAX_LENGTH, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        _dpo(tmp_path, student, None, tokenizer, hot, "bad")
    with pytest.raises(ValueError, match="top_k=50 exceeds"):
        score_dataset(teacher, tokenizer, pairs, tmp_path / "wide", top_k=50, progress=False)
    trainer = _dpo(tmp_path, student, None, tokenizer, scored_pairs, "collate")
    shifted = dict(trainer.train_dataset[1])
    shifted["rejected_teacher_token_ids"] = [t + 1 for t in shifted["rejected_teacher_token_ids"]]
    with pytest.raises(ValueError, match="rejected_teacher_token_ids"):
        trainer.data_collator([trainer.train_dataset[0], shifted])


def test_cli_scores_preference_pairs_then_trains_distill_dpo_without_teacher(tmp_path, teacher, student, tokenizer):
    from trl_distill import cli

    for name, model in (("teacher", teacher), ("student", student)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    cli.main(["teacher-topk", "--teacher", str(tmp_path / "teacher"), "--dataset", "addition", "--data_format",
              "preference", "--addition_num_train", "8", "--top_k", "5", "--max_length", "64", "--output_dir",
              str(tmp_path / "pairs5")])
    stored = load_teacher_topk(tmp_path / "pairs5")
    assert len(stored) == 8 and stored_teacher_info(stored).format == "preference"
    cli.main(["distill-dpo", "--model_name_or_path", str(tmp_path / "student"), "--dataset_name",
              str(tmp_path / "pairs5"), "--output_dir", str(tmp_path / "dckd"), "--mode", "dckd", "--teacher_top_k",
              "5", "--max_length", "64", "--max_steps", "1", "--per_device_train_batch_size", "4", "--bf16", "false",
              "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no", "--use_cpu", "true"])
    assert (tmp_path / "dckd" / "model.safetensors").exists()


def test_two_processes_score_like_one(tmp_path):
    """`accelerate launch --num_processes 2` (CPU, gloo): each process scores its shards; the result equals the
    1-process scoring exactly (same batches, so bit for bit), in both formats."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    script = root / "tests" / "distributed" / "score_topk.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no",
               "--main_process_port", str(port), str(script), str(tmp_path / "two")]
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-6000:]

    sys.path.insert(0, str(script.parent))
    import score_topk

    one = score_topk.score_all(tmp_path / "one")
    for name, expected in one.items():
        got = load_teacher_topk(tmp_path / "two" / name)
        assert sorted(os.listdir(tmp_path / "two" / name / "shards")) == ["shard-00000", "shard-00001", "shard-00002"]
        assert got.column_names == expected.column_names and len(got) == len(expected) == 20
        for column in stored_teacher_info(expected).teacher_columns:
            assert got[column] == expected[column], (name, column)
        assert stored_teacher_info(got) == stored_teacher_info(expected)


def test_4bit_teacher_scores_and_dckd_trains_from_it_like_the_live_4bit_teacher(tmp_path, student, teacher, tokenizer,
                                                                                pairs):
    """bitsandbytes nf4 teacher (fp32 compute on CPU): scored once, then training from the stored columns equals the
    live 4-bit teacher, and differs from the full-precision teacher's scores (the quantized teacher was used)."""
    pytest.importorskip("bitsandbytes")
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    quantized = score_dataset(str(tmp_path / "teacher"), tokenizer, pairs, tmp_path / "nf4", top_k=TOP_K,
                              max_length=DPO_MAX_LENGTH, teacher_quantization="4bit", progress=False)
    full = score_dataset(teacher, tokenizer, pairs, tmp_path / "full", top_k=TOP_K, max_length=DPO_MAX_LENGTH,
                         progress=False)
    assert stored_teacher_info(quantized).teacher_quantization == "4bit"
    assert quantized["chosen_teacher_logps"] != full["chosen_teacher_logps"]
    live = _dpo(tmp_path, copy.deepcopy(student), str(tmp_path / "teacher"), tokenizer, pairs, "live",
                dpo_weight=0.5, teacher_quantization="4bit")
    assert getattr(live.teacher_model, "is_loaded_in_4bit", False)
    offline = _dpo(tmp_path, student, None, tokenizer, quantized, "offline", dpo_weight=0.5, max_steps=1,
                   per_device_train_batch_size=4)
    live_batch = live.data_collator(list(live.train_dataset.select(range(4))))
    expected, expected_grads, _ = _dpo_loss_and_grads(live, live_batch)
    offline_batch = offline.data_collator(list(offline.train_dataset.select(range(4))))
    got, got_grads, _ = _dpo_loss_and_grads(offline, offline_batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    offline.train()
    assert torch.isfinite(torch.tensor(offline.state.log_history[0]["loss"]))


def test_offline_dpo_alone_equals_the_live_teacher_ref_mode(tmp_path, student, teacher, tokenizer, pairs, scored_pairs):
    """mode="dckd" with only dpo_weight > 0 from stored data is TRL's DPO loss with the teacher as reference."""
    live = _dpo(tmp_path, copy.deepcopy(student), teacher, tokenizer, pairs, "live", mode="teacher_ref")
    offline = _dpo(tmp_path, student, None, tokenizer, scored_pairs, "offline", dpo_weight=1.0, sft_weight=0.0,
                   chosen_kd_weight=0.0, rejected_kd_weight=0.0)
    live_batch = live.data_collator([live.train_dataset[i] for i in range(4)])
    offline_batch = offline.data_collator([offline.train_dataset[i] for i in range(4)])
    expected, expected_grads, expected_metrics = _dpo_loss_and_grads(live, live_batch)
    got, got_grads, got_metrics = _dpo_loss_and_grads(offline, offline_batch)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name in expected_grads:
        torch.testing.assert_close(got_grads[name], expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert got_metrics["rewards/margins"] == pytest.approx(expected_metrics["rewards/margins"], rel=1e-4, abs=1e-6)
