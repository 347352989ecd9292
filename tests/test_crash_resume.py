"""Crash and resume (issue #9): a real training process killed with SIGKILL mid-run, resumed from its last checkpoint
with `train(resume_from_checkpoint=True)`, continues exactly as the run that was never interrupted.

Every process runs `tests/crash/train.py` (tiny models, 6 steps, 4 steps an epoch, a checkpoint and a log entry every
step). For each trainer:

1. reference: the uninterrupted run, in its own output_dir (all trainers in one process, to pay the torch + TRL
   import once);
2. crash: a run that stops dead at the start of step 4 (checkpoint-3 complete, nothing of step 4 saved) and writes a
   `paused` marker; the test then kills it with SIGKILL, which no Python code can intercept or clean up after;
3. resume: `train(resume_from_checkpoint=True)` in the crashed output_dir (all trainers in one process). Resuming
   at step 3 skips the first 3 batches of a shuffled epoch, then crosses into the next epoch.

The resumed run must log the same metrics as the reference for steps 4-6 and end with the same weights, optimizer and
scheduler state and, where the trainer has more state, the same extra state: OKD's teacher adapter, its optimizer and
its scheduler; ADPO's moving anchor. One more OKD run is killed in the middle of writing checkpoint-5 (a torn
checkpoint): its resume must skip checkpoint-5 and continue from checkpoint-4, an epoch boundary (the other path
through Trainer's resume code).

Tolerance: none (bitwise). Both runs execute the same code on the same machine with one thread, every CPU kernel used
is deterministic at a fixed thread count, and a resume restores weights (safetensors), optimizer and scheduler
(`torch.save`) and the Python, NumPy and torch RNG states bit for bit, so any difference at all is state the
checkpoint failed to restore, not rounding. A tolerance would hide what this test is for: measured by disabling each
restore in turn, a resume without the RNG states moves OKD's step-4 loss by only 6.6e-4 relative (dropout; GKD's by 19%,
a different on-policy draw), without OKD's teacher optimizer state by 1e-3 relative at step 5, and without its teacher
scheduler only the logged teacher learning rate differs at step 4.

All processes start at once (the paused ones then use no CPU); the module costs about the CPU time of 9 interpreter
starts with torch + TRL (~5 s each) plus ~15 s of training: ~40 s on an idle 2-core machine.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from trl_distill.trainers.okd import OKDTrainer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "crash" / "train.py"
STEPS = 6  # 16 problems in batches of 4 (see the script): 4 steps an epoch
KILL_AFTER = 3  # killed at the start of step 4, checkpoint-3 complete: mid-epoch
TORN_SAVE = 5  # the torn run is killed while writing checkpoint-5, so it resumes from checkpoint-4: an epoch boundary
TORN = "@torn"  # directory tag of that run
PROCESS_TIMEOUT_S = 300

TRAINER_PARAMS = [
    pytest.param("gkd", id="gkd"),
    pytest.param("okd", id="okd"),
    pytest.param("distill-dpo", id="distill-dpo"),
    pytest.param("adpo", id="adpo"),
    pytest.param("adpo-lora", id="adpo-lora"),
    pytest.param("redi", id="redi"),
]
ALL_TRAINERS = [p.values[0] for p in TRAINER_PARAMS]

# Running totals the trainer keeps outside model, optimizer and RNG; they describe the run, not the training.
COUNTERS = ("num_tokens",)

# Extra state each trainer must restore, as `final_state.pt` names it (see the script's `final_state`).
EXPECTED_STATE = {
    "okd": {"teacher_adapter", "teacher_optimizer", "teacher_lr_scheduler"},
    "adpo": {"anchor"},
    "adpo-lora": {"anchor"},
}

# The mixin that makes `resume_from_checkpoint=True` skip a checkpoint whose save was interrupted.
HAS_COMPLETE_CHECKPOINT_RESUME = any(cls.__name__ == "DistillTrainerMixin" for cls in OKDTrainer.__mro__)


@dataclass
class Crash:
    """What the test saw of a run it killed."""

    returncode: int | None = None
    marker: dict | None = None  # what the process wrote just before stopping: pid, step, where ("step" or "save")
    checkpoints: dict[str, bool] = field(default_factory=dict)  # at the kill: name -> complete (trainer_state parses)
    finished: bool = False  # run.json existed at the kill: the run had ended, it was not killed mid-run
    error: str | None = None


@dataclass
class Runs:
    root: Path
    crashes: dict[str, Crash]
    logs: dict[str, str]

    def result(self, kind: str, name: str) -> dict:
        path = self.root / kind / name / "run.json"
        if not path.exists():
            pytest.fail(f"the {kind} run of {name} wrote no run.json; its output:\n{self.logs.get(kind, '')[-6000:]}")
        result = json.loads(path.read_text())
        if "error" in result:
            pytest.fail(f"the {kind} run of {name} raised:\n{result['error']}")
        return result

    def final_state(self, kind: str, name: str) -> dict:
        return torch.load(self.root / kind / name / "final_state.pt", weights_only=True)


# ------------------------------------------------------------------------------------------------ processes
def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # The trl_distill of this tree, as the tests import it (whatever the virtual environment has installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _start(root: Path, kind: str, names: list[str], *extra: str) -> subprocess.Popen:
    log_path = root / f"{kind}-{'+'.join(names)}.log"
    command = [sys.executable, str(SCRIPT), "--trainer", ",".join(names), "--output-dir", str(root / kind),
               "--steps", str(STEPS), *extra]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log_path
    return process


def _checkpoints(run_dir: Path) -> dict[str, bool]:
    found = {}
    for path in sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        try:
            json.loads((path / "trainer_state.json").read_text())
            found[path.name] = True
        except (OSError, ValueError):
            found[path.name] = False
    return found


def _kill_when_paused(processes: dict[str, subprocess.Popen], root: Path) -> dict[str, Crash]:
    """SIGKILL each crash process as soon as it reports being paused; record what was on disk at that moment."""
    crashes = {name: Crash() for name in processes}
    waiting = dict(processes)
    deadline = time.monotonic() + PROCESS_TIMEOUT_S
    while waiting and time.monotonic() < deadline:
        for name, process in list(waiting.items()):
            run_dir, crash = root / "crashed" / name, crashes[name]
            if (run_dir / "paused").exists():  # written atomically, then the process sleeps: nothing moves on disk
                crash.marker = json.loads((run_dir / "paused").read_text())
                crash.checkpoints = _checkpoints(run_dir)
                crash.finished = (run_dir / "run.json").exists()
                process.send_signal(signal.SIGKILL)
                crash.returncode = process.wait()
                del waiting[name]
            elif process.poll() is not None:
                crash.returncode = process.returncode
                crash.error = f"exited ({process.returncode}) before pausing:\n{process.log_path.read_text()[-6000:]}"
                del waiting[name]
        time.sleep(0.02)
    for name, process in waiting.items():
        process.kill()
        process.wait()
        crashes[name].error = f"never paused within {PROCESS_TIMEOUT_S} s:\n{process.log_path.read_text()[-6000:]}"
    return crashes


def _selected_trainers(request) -> list[str]:
    """The trainers whose tests this session runs (so `-k okd` does not pay for the other trainers)."""
    selected = {
        item.callspec.params["trainer"]
        for item in request.session.items
        if item.module.__name__ == __name__ and hasattr(item, "callspec")
    }
    return [name for name in ALL_TRAINERS if name in selected] or ALL_TRAINERS


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("crash_resume")
    (root / "crashed").mkdir()
    trainers = _selected_trainers(request)
    torn = ["okd" + TORN] if HAS_COMPLETE_CHECKPOINT_RESUME and "okd" in trainers else []
    started: list[subprocess.Popen] = []
    resumed = None
    try:
        started.append(reference := _start(root, "reference", trainers))
        crash_processes = {name: _start(root, "crashed", [name], "--pause-at", str(KILL_AFTER)) for name in trainers}
        for name in torn:  # stopped inside checkpoint-5's save: weights and optimizer written, trainer_state.json not
            crash_processes[name] = _start(root, "crashed", [name], "--pause-at", str(TORN_SAVE), "--pause-in", "save")
        started += crash_processes.values()
        crashes = _kill_when_paused(crash_processes, root)

        resumable = [name for name in crash_processes if crashes[name].error is None]
        if resumable:
            started.append(resumed := _start(root, "crashed", resumable, "--resume"))
        logs = {}
        for kind, process in (("reference", reference), ("crashed", resumed)):
            if process is not None:
                try:
                    process.wait(timeout=PROCESS_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    pass  # killed below; the tests then report the missing run.json with this log
                logs[kind] = process.log_path.read_text()
    finally:  # an interrupted session leaves no training process behind
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()
    return Runs(root, crashes, logs)


# ------------------------------------------------------------------------------------------------ comparisons
def _steps(result: dict) -> dict[int, dict]:
    """Per-step training log entries (the run's closing summary, with its timings, has no `loss`)."""
    return {entry["step"]: entry for entry in result["log_history"] if "loss" in entry}


def _assert_same_logs(reference: dict, resumed: dict, steps, keys=None) -> None:
    """Every logged metric (or only `keys`) of `steps` is bitwise the reference's."""
    for step in steps:
        want, got = reference[step], resumed[step]
        assert got.keys() == want.keys(), f"step {step}: logged metrics differ: {sorted(got.keys() ^ want.keys())}"
        differing = {
            key: (want[key], got[key])
            for key in (want.keys() if keys is None else keys)
            if got[key] != want[key]
            and not (isinstance(want[key], float) and math.isnan(want[key]) and math.isnan(got[key]))
        }
        assert not differing, f"step {step}: (reference, resumed) differ: {differing}"


def _assert_same_tree(reference, resumed, path: str) -> None:
    """Bitwise equality of nested state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(reference, torch.Tensor):
        assert isinstance(resumed, torch.Tensor) and resumed.dtype == reference.dtype, path
        assert resumed.shape == reference.shape, f"{path}: shape {tuple(resumed.shape)} != {tuple(reference.shape)}"
        if not torch.equal(resumed, reference):
            delta = (resumed.double() - reference.double()).abs().max().item()
            raise AssertionError(f"{path} differs from the uninterrupted run's (max abs difference {delta:.3g})")
    elif isinstance(reference, dict):
        assert isinstance(resumed, dict) and resumed.keys() == reference.keys(), f"{path}: keys differ"
        for key in reference:
            _assert_same_tree(reference[key], resumed[key], f"{path}[{key!r}]")
    elif isinstance(reference, (list, tuple)):
        assert isinstance(resumed, (list, tuple)) and len(resumed) == len(reference), f"{path}: lengths differ"
        for index, (a, b) in enumerate(zip(reference, resumed)):
            _assert_same_tree(a, b, f"{path}[{index}]")
    else:
        assert resumed == reference, f"{path}: {resumed!r} != {reference!r}"


def _assert_resumed_like_reference(runs: Runs, name: str, resumed_name: str, last_complete: int) -> None:
    reference = runs.result("reference", name)
    resumed = runs.result("crashed", resumed_name)
    assert resumed["resumed_from"] == f"checkpoint-{last_complete}"
    assert resumed["trained_steps"] == list(range(last_complete + 1, STEPS + 1)), "the resume retrained steps"
    reference_steps, resumed_steps = _steps(reference), _steps(resumed)
    assert sorted(reference_steps) == sorted(resumed_steps) == list(range(1, STEPS + 1))
    # The losses and every other metric of the training itself (running counters have their own test below). Later
    # steps first: the assertion that matters; earlier ones come straight from the checkpoint's trainer state.
    metrics = [key for key in reference_steps[STEPS] if key not in COUNTERS]
    _assert_same_logs(reference_steps, resumed_steps, range(last_complete + 1, STEPS + 1), metrics)
    _assert_same_logs(reference_steps, resumed_steps, range(1, last_complete + 1))

    want, got = runs.final_state("reference", name), runs.final_state("crashed", resumed_name)
    assert EXPECTED_STATE.get(name, set()) <= want.keys()
    assert got.keys() == want.keys()
    for key in sorted(want, key=lambda k: k != "model"):  # the weights first, then optimizers, schedulers, extras
        _assert_same_tree(want[key], got[key], key)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("trainer", TRAINER_PARAMS)
def test_sigkilled_run_resumes_exactly(runs, trainer):
    crash = runs.crashes[trainer]
    assert crash.error is None, crash.error
    # The kill landed mid-run: after checkpoint-3 (complete) and before anything of step 4 was saved.
    assert crash.returncode == -signal.SIGKILL
    assert crash.marker["step"] == KILL_AFTER and crash.marker["where"] == "step"
    assert crash.checkpoints == {f"checkpoint-{k}": True for k in range(1, KILL_AFTER + 1)}
    assert not crash.finished
    _assert_resumed_like_reference(runs, trainer, trainer, last_complete=KILL_AFTER)


@pytest.mark.parametrize("trainer", ALL_TRAINERS)
def test_resumed_run_continues_the_token_count(runs, trainer):
    reference, resumed = _steps(runs.result("reference", trainer)), _steps(runs.result("crashed", trainer))
    assert all("num_tokens" in entry for entry in reference.values())
    _assert_same_logs(reference, resumed, range(KILL_AFTER + 1, STEPS + 1), COUNTERS)


@pytest.mark.skipif(
    not HAS_COMPLETE_CHECKPOINT_RESUME,
    reason="needs DistillTrainerMixin (trainers/_common.py): resume_from_checkpoint=True skips incomplete checkpoints",
)
@pytest.mark.parametrize("trainer", ["okd"])  # the trainer whose checkpoints hold the most files of its own
def test_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(runs, trainer):
    name = trainer + TORN
    crash = runs.crashes[name]
    assert crash.error is None, crash.error
    assert crash.returncode == -signal.SIGKILL
    assert crash.marker["step"] == TORN_SAVE and crash.marker["where"] == "save"
    complete = {f"checkpoint-{k}": True for k in range(1, TORN_SAVE)}
    assert crash.checkpoints == {**complete, f"checkpoint-{TORN_SAVE}": False}
    assert not crash.finished
    _assert_resumed_like_reference(runs, trainer, name, last_complete=TORN_SAVE - 1)
