"""A TRL SFT script, as a TRL user writes it: `python sft.py MODEL DATA_JSONL OUTPUT_DIR`.

`tests/test_drop_in.py` runs it as it is (TRL's SFTTrainer) and with the import line and class names swapped for
trl-distill's OKDTrainer (plus `teacher_model=`, which SFT has no use for). Nothing else may change.
"""

import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

model_id, data_file, output_dir = sys.argv[1:4]

model = AutoModelForCausalLM.from_pretrained(model_id)
tokenizer = AutoTokenizer.from_pretrained(model_id)
train_dataset = load_dataset("json", data_files=data_file, split="train")

training_args = SFTConfig(
    output_dir=output_dir,
    max_steps=4,
    per_device_train_batch_size=4,
    learning_rate=1e-3,
    lr_scheduler_type="cosine",
    warmup_steps=1,
    logging_steps=2,
    seed=42,
    # CPU-friendly settings (TRL's defaults target GPUs)
    bf16=False,
    gradient_checkpointing=False,
    report_to="none",
    save_strategy="no",
    disable_tqdm=True,
)
trainer = SFTTrainer(
    model=model,
    args=training_args,
    train_dataset=train_dataset,
    processing_class=tokenizer,
)
trainer.train()
trainer.save_model()
