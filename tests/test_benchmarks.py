"""The evaluation scripts in benchmarks/ still run: run_all's whole pipeline and dpo_vs_trl's worker, at smoke size."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import dpo_vs_trl  # noqa: E402
import run_all  # noqa: E402


def test_run_all_tiny_writes_table_json_and_plots(tmp_path):
    out, plots = tmp_path / "out", tmp_path / "plots"
    # one method of each kind: plain SFT, a teacher-based distiller, a preference method on the SFT warm start
    methods = ["sft", "gkd_jsd", "redi"]
    results = run_all.main(["--size", "tiny", "--in-process", "--device", "cpu", "--methods", *methods,
                            "--output-dir", str(out), "--plot-dir", str(plots)])

    rows = results["rows"]
    assert [row["method"] for row in rows] == methods
    for row in rows:
        assert set(run_all.COLUMNS) <= set(row)
        assert row["steps"] == run_all.SIZES["tiny"]["steps"]
        assert 0.0 <= row["exact_match"] <= 1.0
        for key in ("train_seconds", "tokens_per_s", "peak_mib"):
            assert math.isfinite(row[key]) and row[key] >= 0, (row["method"], key, row[key])
        assert row["tokens"] > 0 and row["tokens_per_s"] > 0
        assert [step for step, _ in row["curve"]] == [0, 1, 2]  # step 0, then every step (eval_every=1)
        assert row["loss"] and all(math.isfinite(loss) for _, loss in row["loss"])
    assert [row["start"] for row in rows] == ["fresh", "fresh", "SFT warm start (2 steps)"]
    assert 0.0 <= results["info"]["warm_start_exact_match"] <= 1.0

    table = (out / "run_all.md").read_text()
    header = table.splitlines()[0]
    for column in ("method", "exact match", "train time", "tokens/s", "peak memory"):
        assert column in header
    assert len([line for line in table.splitlines() if line.startswith("| ")]) == 1 + len(methods)
    saved = json.loads((out / "run_all.json").read_text())
    assert [row["method"] for row in saved["rows"]] == methods
    for name in ("run_all_loss_curves.png", "run_all_metric_vs_steps.png"):
        assert (plots / name).stat().st_size > 0


def test_run_all_sizes_cover_every_loss_and_method():
    from trl_distill.losses import LOSS_TYPES

    assert {f"gkd_{loss}" for loss in LOSS_TYPES} <= set(run_all.METHODS)
    assert {"sft", "okd", "distill_dpo", "dpo", "adpo", "redi"} <= set(run_all.METHODS)
    assert set(run_all.SIZES) == {"tiny", "small", "medium", "large"}
    assert run_all.parse_args([]).size == "small"


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


def test_gkd_divergences_smoke(tmp_path):
    import gkd_divergences

    results = gkd_divergences.main(["--runs", "trl:reverse_kl:steps=2", "ours:tvd:warm=1", "--steps", "1",
                                    "--output-dir", str(tmp_path)])
    assert results[1]["warm_exact_match"] is not None and results[0]["warm_exact_match"] is None
    assert [(r["trainer"], r["loss_type"], r["warm"], r["steps"]) for r in results] == [
        ("trl", "reverse_kl", 0, 2), ("ours", "tvd", 1, 1)]
    for r in results:
        assert 0.0 <= r["exact_match"] <= 1.0 and 0.0 <= r["wrong_fraction"] <= 1.0
        assert math.isfinite(r["last_loss"]) and math.isfinite(r["last_grad_norm"])
    assert json.loads((tmp_path / "results.json").read_text())[0]["spec"] == "trl:reverse_kl:steps=2"
    with pytest.raises(ValueError, match="TRL's GKDTrainer runs"):
        gkd_divergences.parse_spec("trl:tvd", 10)
    with pytest.raises(ValueError, match="options are warm=N and steps=N"):
        gkd_divergences.parse_spec("ours:tvd:lr=3", 10)


def test_okd_quality_smoke(tmp_path, capsys):
    import okd_quality

    okd_quality.main(["--steps", "2", "--eval-every", "1", "--batch-size", "4", "--alphas", "0.1", "0.5",
                      "--threads", "1", "--output-dir", str(tmp_path), "--plot", ""])
    summary = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in summary["results"]] == ["sft", "kd", "okd_alpha0.1", "okd_alpha0.5"]
    for r in summary["results"]:
        assert [p["step"] for p in r["curve"]][-1] == 2
    assert 0.0 <= summary["teacher_exact_match"] <= 1.0

    # --merge of several seeds: a per-seed table with the mean and win counts, and a mean-curve plot
    other = tmp_path / "seed1.json"
    other.write_text(json.dumps({**summary, "config": {**summary["config"], "seed": 1}}))
    okd_quality.main(["--merge", str(tmp_path / "results.json"), str(other), "--plot", str(tmp_path / "seeds.png")])
    printed = capsys.readouterr().out
    assert "| seed | SFT only | frozen-teacher KD (forward KL) | OKD (alpha=0.1) | OKD (alpha=0.5) | teacher |" in printed
    assert "| mean | " in printed and "| median | " in printed and "OKD (alpha=0.1) vs SFT only: higher in 0 of 2 seeds" in printed
    assert (tmp_path / "seeds.png").stat().st_size > 0


@pytest.mark.parametrize("sweep", [False, True])
def test_okd_speed_smoke(tmp_path, sweep):
    import okd_speed

    output = tmp_path / "speed.json"
    argv = ["--batch-size", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--output", str(output)]
    if sweep:
        argv += ["--completion-lengths", "2", "--rounds", "1", "--teacher-shape", "1x32", "--student-shape", "1x16"]
    okd_speed.main(argv)
    assert output.stat().st_size > 0
