"""benchmarks/gpu_check.py at its CPU smoke size: every row trains, and one failing row is reported, not fatal."""

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402


def tiny_argv(tmp_path, *extra):
    return ["--device", "cpu", "--tiny", "--in-process", "--work-dir", str(tmp_path / "models"),
            "--output-dir", str(tmp_path / "out"), *extra]


def test_gpu_check_tiny_runs_every_row_and_writes_table_and_json(tmp_path, capsys):
    results = gpu_check.main(tiny_argv(tmp_path))

    rows = {r["row"]: r for r in results["rows"]}
    assert list(rows) == list(gpu_check.ROWS)
    for name, r in rows.items():
        needed = gpu_check.NEEDS.get(name)
        if needed and results["packages"][needed] is None:
            assert r["status"] == f"skipped: {needed} not importable"
            continue
        assert r["status"] == "ok", (name, r.get("error"))
        assert r["loss_finite"] and len(r["losses"]) == 2, name  # logging_steps=1, 2 steps
        assert r["tokens"] > 0 and r["tokens_per_s"] > 0 and math.isfinite(r["peak_mib"]), name
    # GKDVariant's defaults are TRL's GKD loss: the same seed, data and samples give TRL's losses (chunked vs dense)
    assert rows["gkd_on"]["losses"] == pytest.approx(rows["trl_gkd"]["losses"], rel=1e-4)
    # the tokenizer the rows use is the word-level one (not a BPE rebuilt from the model directory's config)
    assert rows["gkd_off"]["tokens"] == 2 * (6 + 6 + 3)  # 1 timed step, batch 2: words + user/assistant/end markers

    saved = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [r["row"] for r in saved["rows"]] == list(gpu_check.ROWS)
    assert saved["settings"]["vocab"] == 256 and saved["settings"]["steps"] == 2
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table.splitlines()[0].startswith("| row | trainer | status | tokens/s | peak memory (MiB) | loss finite")
    assert len(table.splitlines()) == 2 + len(gpu_check.ROWS)
    assert table in capsys.readouterr().out


def test_gpu_check_reports_a_failing_row_and_runs_the_next(tmp_path, monkeypatch):
    build = gpu_check.build_trainer

    def broken_okd(row, *args):
        if row == "okd":
            raise RuntimeError("CUDA out of memory (simulated)")
        return build(row, *args)

    monkeypatch.setattr(gpu_check, "build_trainer", broken_okd)
    results = gpu_check.main(tiny_argv(tmp_path, "--rows", "okd", "redi"))
    okd, redi = results["rows"]
    assert okd["status"] == "error: RuntimeError" and "CUDA out of memory (simulated)" in okd["error"]
    assert not okd["loss_finite"] and math.isnan(okd["tokens_per_s"])
    assert redi["status"] == "ok" and redi["loss_finite"]


def test_gpu_check_time_box(tmp_path):
    cli = gpu_check.parse_args(tiny_argv(tmp_path))
    # a row in a fresh process that outlives its limit is killed and reported
    row = gpu_check.run_isolated("redi", cli, ["--device", "cpu", "--tiny"], timeout=0.5)
    assert row["status"] == "timeout" and row["row"] == "redi"
    # rows left without budget are not started
    results = gpu_check.main(tiny_argv(tmp_path, "--rows", "redi", "--budget", "5"))
    assert results["rows"][0]["status"] == "skipped: time budget spent"
