"""Crash-and-resume harness (issue #9, "Reliability"): train one or more trainers on tiny offline models.

    python tests/crash/train.py --trainer okd --output-dir OUT [--resume] [--pause-at K [--pause-in step|save]]

Trainers: gkd, okd, distill-dpo, adpo (full model, periodic anchor), adpo-lora (LoRA policy, EMA anchor), redi.
Each trainer trains `--steps` optimizer steps on the shipped addition task with a checkpoint every step and a log
entry every step, in `OUT/<trainer>/` (several trainers, comma-separated or `all`, run one after the other in one
process, so the import of torch + TRL is paid once; `okd@torn` runs okd in `OUT/okd@torn/`). At the end it writes,
beside the checkpoints:

- `run.json`: `log_history` (the TrainerState's, so a resumed run includes the entries restored from its checkpoint),
  `trained_steps` (the optimizer steps this process actually ran), `resumed_from` and, if the trainer raised, `error`;
- `final_state.pt`: the student's weights, its optimizer and scheduler, and the trainer's own state: OKD's teacher
  adapter, teacher optimizer and teacher scheduler; ADPO's anchor (the full anchor model, or its `ref` adapter).

`--pause-at K` makes the run stop dead and wait to be killed (it writes `OUT/<trainer>/paused` first, so a test knows
when): `--pause-in step` (default) at the start of step K+1, once checkpoint-K is complete; `--pause-in save` in the
middle of writing checkpoint-K (model, optimizer and scheduler written; RNG state and `trainer_state.json` not yet), a
torn checkpoint. A paused process exits on its own (status 3) after `PAUSE_LIMIT_S` if nobody kills it.

`--resume` calls `train(resume_from_checkpoint=True)`: the newest (complete) checkpoint in `OUT/<trainer>/`.

Settings are chosen so that every piece of state a resume must restore is exercised: a cosine learning-rate decay
(scheduler), AdamW moments (optimizer), dropout in OKD's online module and GKD's sampled on-policy completions with
`lmbda=0.5` (torch and Python RNG; steps 3, 4 and 6 are on-policy), ADPO's periodic anchor refreshed every 2 steps and
the LoRA policy's EMA anchor, OKD's teacher adapter with its own optimizer and scheduler, DistillDPO's greedy student
responses (ADPA); 16 problems in batches of 4 make 4 steps an epoch, so a resume at step 3 skips batches of a
shuffled epoch and then crosses into the next one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models; the machine is shared (and one thread is also faster here)

from transformers import TrainerCallback, set_seed  # noqa: E402

from trl_distill import addition  # noqa: E402
from trl_distill.testing import tiny_causal_lm  # noqa: E402

TRAINERS = ("gkd", "okd", "distill-dpo", "adpo", "adpo-lora", "redi")
PAUSE_LIMIT_S = 300.0
N_PROBLEMS = 16
BATCH_SIZE = 4


def _common_args(output_dir: str, steps: int, save_steps: int) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=steps,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        per_device_train_batch_size=BATCH_SIZE,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )


def _models(tokenizer):
    teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1)
    student = tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=2)
    return teacher, student


def build(name: str, output_dir: str, steps: int, save_steps: int):
    """The trainer `name` on fresh tiny models and the addition task; identical for every process."""
    # Trainer seeds the RNGs itself (`args.seed`), but only in its __init__: what is drawn before (OKD's fresh online
    # module, a LoRA policy's adapter, both initialised before `Trainer.__init__`) would otherwise depend on whatever
    # this process ran earlier (here: the trainers before this one).
    set_seed(0)
    tokenizer = addition.make_tokenizer()
    teacher, student = _models(tokenizer)
    problems, _ = addition.make_splits(seed=0, n_train=N_PROBLEMS, n_eval=16)
    common = _common_args(output_dir, steps, save_steps)

    if name == "gkd":
        from trl_distill import GKDVariant, GKDVariantConfig

        # lmbda=0.5: the Python RNG decides which steps are on-policy, torch's samples the completions.
        args = GKDVariantConfig(**common, lmbda=0.5, max_new_tokens=4, temperature=0.9, loss_chunk_size=7)
        return GKDVariant(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=addition.sft_dataset(problems, format="messages"),
            processing_class=tokenizer,
        )
    if name == "okd":
        from trl_distill import OKDConfig, OKDTrainer

        # Dropout in the online module draws from torch's RNG at every step.
        args = OKDConfig(**common, teacher_learning_rate=3e-3, teacher_lora_r=8, teacher_lora_alpha=16,
                         teacher_lora_dropout=0.1, alpha=0.3)
        return OKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=addition.sft_dataset(problems, format="messages"),
            processing_class=tokenizer,
        )
    if name == "distill-dpo":
        from peft import LoraConfig, get_peft_model

        from trl_distill import DistillDPOConfig, DistillDPOTrainer

        # A LoRA teacher (adapter on = aligned, off = reference) so every term runs: DPO with the teacher as
        # reference, DCKD's two KL terms and ADPA's advantage on the student's own greedy responses.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            teacher = get_peft_model(
                teacher, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            )
        args = DistillDPOConfig(**common, mode="adpa", dpo_weight=0.5, chosen_kd_weight=0.1, rejected_kd_weight=0.1,
                                teacher_top_k=5, adpa_responses="student", adpa_max_new_tokens=4)
        return DistillDPOTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=addition.preference_dataset(problems),
            processing_class=tokenizer,
        )
    if name in ("adpo", "adpo-lora"):
        from peft import LoraConfig

        from trl_distill import ADPOConfig, ADPOTrainer

        if name == "adpo":  # full model: the anchor is a second model, refreshed from the policy every 2 steps
            anchor, peft_config = dict(anchor="periodic", anchor_refresh_steps=2), None
        else:  # LoRA policy: the anchor is a frozen `ref` adapter, an EMA of the trained one
            anchor = dict(anchor="ema", ema_decay=0.5)
            peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
        args = ADPOConfig(**common, **anchor, anchor_kl_coef=0.1)
        return ADPOTrainer(
            model=student,
            args=args,
            train_dataset=addition.listwise_dataset(problems, k=3),
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if name == "redi":
        from trl_distill import REDIConfig, REDITrainer

        return REDITrainer(
            model=student,
            args=REDIConfig(**common, alpha=0.8),
            train_dataset=addition.preference_dataset(problems),
            processing_class=tokenizer,
        )
    raise ValueError(f"unknown trainer {name!r}; one of {TRAINERS}")


def _clone(tree):
    """A deep CPU copy of a (nested) state dict, so what is saved is not a view of live parameters."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu().clone()
    if isinstance(tree, dict):
        return {k: _clone(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone(v) for v in tree)
    return tree


def final_state(trainer) -> dict:
    """Everything a resume has to restore, at the end of training."""
    state = {
        "model": _clone(trainer.accelerator.unwrap_model(trainer.model).state_dict()),
        "optimizer": _clone(trainer.optimizer.state_dict()),
        "lr_scheduler": _clone(trainer.lr_scheduler.state_dict()),
    }
    if getattr(trainer, "teacher_optimizer", None) is not None:  # OKD's online module
        state["teacher_adapter"] = _clone({n: p for n, p in trainer.teacher_parameters})
        state["teacher_optimizer"] = _clone(trainer.teacher_optimizer.state_dict())
        state["teacher_lr_scheduler"] = _clone(trainer.teacher_lr_scheduler.state_dict())
    anchor = getattr(trainer.args, "anchor", None)
    if anchor in ("ema", "periodic"):  # ADPO's moving anchor
        if trainer.ref_model is not None:
            state["anchor"] = _clone(trainer.accelerator.unwrap_model(trainer.ref_model).state_dict())
        else:
            model = trainer.accelerator.unwrap_model(trainer.model)
            state["anchor"] = _clone({n: p for n, p in model.named_parameters() if ".ref." in n})
    return state


class _Recorder(TrainerCallback):
    """Records which optimizer steps this process ran; optionally stops dead at step K+1 and waits to be killed."""

    def __init__(self, output_dir: Path, pause_at: int | None):
        self.output_dir, self.pause_at, self.trained_steps = output_dir, pause_at, []

    def on_step_begin(self, args, state, control, **kwargs):
        if self.pause_at is not None and state.global_step == self.pause_at:
            pause(self.output_dir, state.global_step, "step")

    def on_step_end(self, args, state, control, **kwargs):
        self.trained_steps.append(state.global_step)


def pause(output_dir: Path, step: int, where: str) -> None:
    """Tell the test where we are (atomically), then wait to be killed."""
    tmp = output_dir / ".paused.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "step": step, "where": where}))
    os.replace(tmp, output_dir / "paused")
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"paused for {PAUSE_LIMIT_S} s and nobody killed us: exiting", file=sys.stderr)
    os._exit(3)


def _pause_inside_save(trainer, output_dir: Path, step: int) -> None:
    """Stop in checkpoint-`step`'s save after the model, optimizer and scheduler (and OKD's teacher files) are
    written, before the RNG state and `trainer_state.json` (which transformers writes last)."""
    save_rng_state = trainer._save_rng_state

    def paused_save_rng_state(checkpoint_dir):
        if trainer.state.global_step == step:
            pause(output_dir, step, "save")
        return save_rng_state(checkpoint_dir)

    trainer._save_rng_state = paused_save_rng_state


def run(name: str, output_dir: Path, args) -> int:
    output_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"trainer": name, "resumed_from": None, "trained_steps": []}
    try:
        trainer = build(name, str(output_dir), args.steps, args.save_steps)
        recorder = _Recorder(output_dir, args.pause_at if args.pause_in == "step" else None)
        trainer.add_callback(recorder)
        if args.pause_at is not None and args.pause_in == "save":
            _pause_inside_save(trainer, output_dir, args.pause_at)
        load_from_checkpoint = trainer._load_from_checkpoint

        def recorded_load_from_checkpoint(checkpoint, *rest, **kwargs):  # which checkpoint `True` resolved to
            result["resumed_from"] = os.path.basename(os.path.normpath(checkpoint))
            return load_from_checkpoint(checkpoint, *rest, **kwargs)

        trainer._load_from_checkpoint = recorded_load_from_checkpoint
        trainer.train(resume_from_checkpoint=True if args.resume else None)
        result["trained_steps"] = recorder.trained_steps
        result["log_history"] = trainer.state.log_history
        torch.save(final_state(trainer), output_dir / "final_state.pt")
        status = 0
    except Exception:  # one trainer's failure must not hide the others' results
        result["error"] = traceback.format_exc()
        print(result["error"], file=sys.stderr)
        status = 1
    (output_dir / "run.json").write_text(json.dumps(result, indent=1))
    return status


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--trainer", required=True,
        help=f"comma-separated, of {', '.join(TRAINERS)}, or 'all'; NAME@TAG runs NAME in OUTPUT_DIR/NAME@TAG",
    )
    parser.add_argument("--output-dir", required=True, type=Path, help="each trainer writes to OUTPUT_DIR/<trainer>")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="train(resume_from_checkpoint=True)")
    parser.add_argument("--pause-at", type=int, default=None, help="stop dead after checkpoint K and wait for a kill")
    parser.add_argument("--pause-in", choices=("step", "save"), default="step")
    args = parser.parse_args(argv)
    names = TRAINERS if args.trainer == "all" else tuple(args.trainer.split(","))
    for name in names:
        if name.split("@")[0] not in TRAINERS:
            parser.error(f"unknown trainer {name!r}; one of {', '.join(TRAINERS)}")
    return max(run(name.split("@")[0], args.output_dir / name, args) for name in names)


if __name__ == "__main__":
    sys.exit(main())
