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
