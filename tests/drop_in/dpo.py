"""A TRL DPO script with LoRA, as a TRL user writes it: `python dpo.py MODEL DATA_JSONL OUTPUT_DIR`.

`tests/test_drop_in.py` runs it as it is (TRL's DPOTrainer) and with the import line and class names swapped for
trl-distill's DistillDPOTrainer (plus `teacher_model=`), ADPOTrainer and REDITrainer. Nothing else may change.
"""

import sys

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

model_id, data_file, output_dir = sys.argv[1:4]

model = AutoModelForCausalLM.from_pretrained(model_id)
tokenizer = AutoTokenizer.from_pretrained(model_id)
train_dataset = load_dataset("json", data_files=data_file, split="train")

training_args = DPOConfig(
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
peft_config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
trainer = DPOTrainer(
    model=model,
    args=training_args,
    processing_class=tokenizer,
    train_dataset=train_dataset,
    peft_config=peft_config,
)
trainer.train()
trainer.save_model()
