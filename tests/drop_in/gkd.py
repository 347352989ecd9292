"""A TRL GKD script, as a TRL user writes it: `python gkd.py MODEL TEACHER DATA_JSONL OUTPUT_DIR`.

`tests/test_drop_in.py` runs it as it is (TRL's experimental GKDTrainer) and with the import line and class names
swapped for trl-distill's GKDVariant. Nothing else may change.
"""

import sys

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.experimental.gkd import GKDConfig, GKDTrainer

model_id, teacher_id, data_file, output_dir = sys.argv[1:5]

model = AutoModelForCausalLM.from_pretrained(model_id)
teacher_model = AutoModelForCausalLM.from_pretrained(teacher_id)
tokenizer = AutoTokenizer.from_pretrained(model_id)
train_dataset = load_dataset("json", data_files=data_file, split="train")

training_args = GKDConfig(
    output_dir=output_dir,
    lmbda=0.5,  # on-policy half of the time: the student writes the completions
    beta=0.5,
    max_new_tokens=8,
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
trainer = GKDTrainer(
    model=model,
    teacher_model=teacher_model,
    args=training_args,
    processing_class=tokenizer,
    train_dataset=train_dataset,
)
trainer.train()
trainer.save_model()
