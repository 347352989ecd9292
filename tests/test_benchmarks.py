"""The benchmark scripts still run at smoke size: quality.py's whole pipeline and its two diagnostics, dpo_vs_trl's worker,
okd_speed."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import dpo_vs_trl  # noqa: E402


@pytest.mark.parametrize("kind", ["trl_teacher", "distill", "redi"])
def test_dpo_vs_trl_worker(kind):
    args = dpo_vs_trl.parse_args(["--vocab-size", "64", "--prompt-len", "4", "--completion-len", "6", "--teacher",
                                  "1x32", "--student", "1x16", "--warmup-steps", "1", "--timed-steps", "1",
                                  "--batch-size", "2", "--device", "cpu"])
    result = dpo_vs_trl.run_worker(args, kind)
    assert result["timed_tokens"] > 0
    for key in ("tokens_per_s", "seconds", "peak_bytes", "first_loss"):
        assert math.isfinite(result[key]), key
    if kind == "distill":  # teacher_ref with no extra term is TRL's DPO with ref_model=teacher
        assert result["first_loss"] == pytest.approx(dpo_vs_trl.run_worker(args, "trl_teacher")["first_loss"])


@pytest.mark.parametrize("sweep", [False, True])
def test_okd_speed_smoke(tmp_path, sweep):
    import okd_speed

    output = tmp_path / "speed.json"
    argv = ["--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--output", str(output)]
    if sweep:
        argv += ["--completion-lengths", "2", "--rounds", "1", "--teacher-shape", "1x32", "--student-shape", "1x16"]
    okd_speed.main(argv)
    assert output.stat().st_size > 0


def test_quality_quick_runs_every_method_and_resumes(tmp_path, monkeypatch):
    """`benchmarks/quality.py --quick`: every method of the table trains, is measured against p*, and lands in the
    JSON, the tables and the plots; a second call repeats no run."""
    import quality

    monkeypatch.setenv("TRL_DISTILL_CACHE", str(tmp_path / "cache"))  # the tiny teacher is trained, not reused
    out = tmp_path / "out"
    results = quality.main(["--quick", "--output-dir", str(out), "--plot-dir", str(tmp_path)])
    assert [row["method"] for row in results["best"]] == list(quality.ALL_METHODS)
    runs = (out / "runs.jsonl").read_text().splitlines()
    assert len(runs) == len(quality.ALL_METHODS)
    for line in runs:
        row = json.loads(line)
        assert row["steps"] == quality.SIZES["quick"]["steps"], row["method"]
        assert math.isfinite(row["forward_kl"]) and row["forward_kl"] > 0
        for key in ("validity", "validity_greedy"):
            assert 0.0 <= row[key] <= 1.0
        assert row["tokens"] > 0 and math.isfinite(row["peak_mib"])
        assert [p["step"] for p in row["curve"]][0] == 0 and row["curve"][-1]["step"] == row["steps"]
        if row["method"] in quality.PREFERENCE_METHODS:
            assert row["n_pairs"] > 0 and 0.0 <= row["start_sample_validity"] <= 1.0
        assert row["cpu"] and (row["teacher_sha"] is not None) == (row["method"] in quality.TEACHER_METHODS)
        assert (quality.run_dir(str(out), row["method"], 0, row["learning_rate"]) / "final" / "config.json").exists()
    assert 0.0 <= results["info"]["teacher_validity"] <= 1.0
    assert {json.loads(line)["teacher_sha"] for line in runs} == {None, results["info"]["teacher_sha"]}

    # exposure_bias.py measures the saved students: mistakes after their own first one and after an injected one.
    import exposure_bias

    gkd = ["gkd_forward_kl_l0", "gkd_forward_kl_l0.5", "gkd_forward_kl_l1"]
    bias = exposure_bias.main(["--size", "quick", "--output-dir", str(out), "--learning-rate", "3e-3", "--seeds", "0",
                               "--n", "8", "--methods", "sft", *gkd, "--start-dir", str(out)])
    assert list(bias["table"]) == ["teacher", "sft start (lr 0.003)", "sft", *gkd]
    assert bias["runs"]["sft"] == bias["runs"]["sft start (lr 0.003)"]  # the same saved student, measured alike
    for stats in bias["table"].values():
        assert 0.0 <= stats["mistake_rate"][0] <= 1.0 and 0.0 <= stats["injected_after_mistake_rate"][0] <= 1.0
    assert set(bias["pairs"]) == {"gkd_forward_kl_l0.5 - gkd_forward_kl_l0", "gkd_forward_kl_l1 - gkd_forward_kl_l0"}
    assert "| gkd_forward_kl_l1 - gkd_forward_kl_l0 |" in (out / "exposure_bias.md").read_text()
    with pytest.raises(FileNotFoundError, match="no saved student of trl_gkd seed 0 lr 0.001"):
        exposure_bias.main(["--size", "quick", "--output-dir", str(out), "--learning-rate", "1e-3", "--seeds", "0",
                            "--methods", "trl_gkd"])
    assert "| gkd_forward_kl_l0 |" in (out / "quality.md").read_text()
    for name in ("quality_bars.png", "quality_curves.png"):
        assert (tmp_path / name).stat().st_size > 0

    quality.main(["--quick", "--output-dir", str(out), "--plot-dir", "", "--methods", "sft", "redi"])
    assert len((out / "runs.jsonl").read_text().splitlines()) == len(runs)  # already done: not repeated

    # The default way: each run in a worker forked from the preloading server, dpo waiting for its seed's sft.
    # Same numbers as in this process, to the last bit (nothing depends on the process), and each run's output
    # kept in its worker.log.
    workers = tmp_path / "workers"
    quality.main(["--size", "quick", "--output-dir", str(workers), "--plot-dir", "", "--methods", "dpo", "sft",
                  "--jobs", "2"])
    in_process = {row["method"]: row for row in map(json.loads, runs)}
    for row in map(json.loads, (workers / "runs.jsonl").read_text().splitlines()):
        for key in ("forward_kl", "validity", "validity_greedy", "curve", "loss", "n_pairs", "tokens"):
            assert row.get(key) == in_process[row["method"]].get(key), (row["method"], key)
        assert (quality.run_dir(str(workers), row["method"], 0, row["learning_rate"]) / "worker.log").stat().st_size
    assert len(list((workers / "preference_data").glob("s0_*.json"))) == 1


def test_quality_method_groups():
    import quality
    from trl_distill.losses import LOSS_TYPES

    assert {f"gkd_{loss}_l{lmbda}" for loss in LOSS_TYPES for lmbda in ("0", "0.5", "1")} <= set(quality.ALL_METHODS)
    assert set(quality.CORE_METHODS) <= set(quality.ALL_METHODS)
    assert quality.parse_args([]).methods == list(quality.CORE_METHODS)
    assert quality.parse_args(["--methods", "preference"]).methods == list(quality.PREFERENCE_METHODS)
    with pytest.raises(SystemExit):
        quality.parse_args(["--methods", "nonsense"])


def test_quality_curve_styles_colour_a_family_and_dash_its_settings():
    """The curves plot: a divergence (or OKD, ADPA) keeps one colour across its settings, which the line style tells
    apart; different families never share a colour; runs continued from SFT are marked."""
    import quality

    methods = list(quality.ALL_METHODS)
    styles = quality.curve_styles(methods, continued=set(quality.PREFERENCE_METHODS))
    for family in ([f"gkd_jsd_l{x}" for x in ("0", "0.5", "1")], list(quality.OKD_METHODS),
                   ["ddpo_adpa", "ddpo_adpa_k5"]):
        assert len({styles[m]["color"] for m in family}) == 1, family
        assert len({styles[m]["linestyle"] for m in family}) == len(family), family
    firsts = ["sft", "seqkd", *(f"gkd_{loss}_l0" for loss in quality.LOSS_TYPES), "trl_gkd", "trl_distillation",
              "okd_a0.1", "dpo", "ddpo_teacher_ref", "ddpo_dckd", "ddpo_adpa", "adpo_fixed", "adpo_ema", "redi",
              "sft_pos"]
    assert len({styles[m]["color"] for m in firsts}) == len(firsts) == 20
    assert styles["dpo"]["marker"] == "x" and styles["sft"]["marker"] == "."


def test_adpa_advantage_diagnostic_smoke(tmp_path):
    # The diagnostic of ADPA's advantage (docs/benchmarks.md): at smoke size, every share is a fraction and the full
    # top-k (the whole vocabulary) holds the impossible tokens that a top-1 can avoid.
    import adpa_advantage

    results = adpa_advantage.main(["--size", "quick", "--output-dir", str(tmp_path), "--n", "8", "--top-k", "69", "1"])
    assert results["positions"] == 8 * 33 and results["vocabulary"] == 69
    for k in (69, 1):
        row = results[f"top_{k}"]
        assert all(0.0 <= row[key] <= 1.0 for key in ("argmax_advantage_impossible", "top_k_impossible",
                                                       "clamped_max_impossible", "reference_argmax_impossible"))
    assert results["top_69"]["top_k_impossible"] > 0.5  # most of the vocabulary is impossible at any position
    assert json.loads((tmp_path / "adpa_advantage.json").read_text()) == results


def test_onpolicy_prefixes_counts_positions_after_the_first_impossible_move():
    import onpolicy_prefixes
    import torch

    from trl_distill import hmm_task

    config = hmm_task.TaskConfig()
    lang = hmm_task.language(config)
    prompts, completions = hmm_task.sample_pairs(config, 3, "eval")
    end = torch.full((3, 1), hmm_task.END_ID)
    tokens = torch.cat([completions + hmm_task.WORD_OFFSET, end], 1)  # samples of p*: valid, nothing after an error
    assert onpolicy_prefixes.positions_after_first_error(config, prompts, tokens) == (3 * 33, 0, 0)
    # Row 0: an impossible word at position 5 (27 loss positions follow it); row 1: the end token first (1 position).
    probs = lang.next_word_probs(torch.cat([prompts, completions], 1))[0, prompts.shape[1] + 5]
    tokens[0, 5] = int((probs == 0).nonzero()[0]) + hmm_task.WORD_OFFSET
    tokens[1, 0] = hmm_task.END_ID
    assert onpolicy_prefixes.positions_after_first_error(config, prompts, tokens) == (33 + 1 + 33, 27, 2)


def test_onpolicy_prefixes_smoke(tmp_path):
    import onpolicy_prefixes
    import quality

    from trl_distill import hmm_task

    tokenizer = hmm_task.make_tokenizer(quality.task().n_words)
    student = quality.fresh_student(quality.SIZES["quick"], tokenizer, seed=0)  # stands for a trained SFT student
    student.save_pretrained(quality.run_dir(str(tmp_path), "sft", 0, 3e-3) / "final")
    results = onpolicy_prefixes.main(["--size", "quick", "--output-dir", str(tmp_path), "--seeds", "0", "--n", "4"])
    for start in ("sft", "fresh"):
        assert 0.0 <= results[start]["after_first_error_mean"] <= 1.0
    # the same weights in both rows, sampled with the same seed: the same share
    assert results["sft"]["after_first_error_mean"] == results["fresh"]["after_first_error_mean"]
