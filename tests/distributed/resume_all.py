"""Checkpoint and resume under `accelerate launch` (tests/test_distributed.py runs it under DeepSpeed ZeRO-2 and -3).

    accelerate launch ... resume_all.py OUT_DIR PHASE NAME [NAME ...]

PHASE is `straight` (4 optimizer steps, a checkpoint every step) or `resumed` (trained on to step 4, with
`resume_from_checkpoint=True`, from a folder that holds only `straight`'s checkpoint at step 2: the caller copies it
there, as a run interrupted after step 2 would have left it). Each writes the trainable
parameters, whole (ZeRO-3 shards gathered), to OUT_DIR/NAME.PHASE.pt on process 0, and the logged losses to
NAME.PHASE.json. AdamW with a schedule, so the optimizer and scheduler states have to come back too, and the
trainers' own state: OKD's teacher adapter with its optimizer and scheduler, ADPO's full-model EMA anchor. Under
DeepSpeed `Trainer` restores the model through the engine and never calls `_load_from_checkpoint`, the hook these
used to rely on.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from train_all import build, trainable  # noqa: E402


def main() -> None:
    out_dir, phase, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for name in names:
        run_dir = os.path.join(out_dir, phase)
        trainer = build(
            name, run_dir, 8, 8 // world_size, max_steps=4, save_strategy="steps", save_steps=1,
            optim="adamw_torch", learning_rate=1e-2, lr_scheduler_type="linear",
        )
        trainer.train(resume_from_checkpoint=True if phase == "resumed" else None)
        params = trainable(trainer)
        if trainer.accelerator.is_main_process:
            stem = os.path.join(out_dir, f"{name}.{phase}")
            import torch

            torch.save(params, stem + ".pt")
            with open(stem + ".json", "w") as f:
                json.dump([e["loss"] for e in trainer.state.log_history if "loss" in e], f)
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
