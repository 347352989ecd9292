"""Score the addition task's conversations and preference pairs with the tiny test teacher, under `accelerate launch`
or in-process (tests/test_offline_teacher.py compares 2 processes against 1).

    accelerate launch --num_processes 2 tests/distributed/score_topk.py OUT_DIR
"""

import sys
from pathlib import Path


def score_all(out_dir: Path) -> dict:
    """Both formats, 3 shards each (the 2 processes score 2 and 1), batches that do not divide the shards."""
    import torch

    from trl_distill import addition
    from trl_distill.offline_teacher import score_dataset
    from trl_distill.testing import tiny_causal_lm

    torch.set_num_threads(1)
    tokenizer = addition.make_tokenizer()
    teacher = tiny_causal_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1)  # conftest's teacher
    train, _ = addition.make_splits(seed=0, n_train=64, n_eval=16)
    data = {"messages": addition.sft_dataset(train[:20], format="messages"),
            "preference": addition.preference_dataset(train[:20])}
    return {name: score_dataset(teacher, tokenizer, dataset, Path(out_dir) / name, top_k=6, max_length=11,
                                batch_size=3, shard_size=8, progress=False)
            for name, dataset in data.items()}


if __name__ == "__main__":
    score_all(Path(sys.argv[1]))
