"""Offline teacher: storage per token against k, scoring throughput, and training with a stored teacher against a
live 4-bit and a live full-precision teacher (same student, same data, one run).

    python benchmarks/offline_teacher.py                 # the docs/benchmarks.md numbers (CPU, a few minutes)
    python benchmarks/offline_teacher.py --size tiny     # smoke size (tests/test_offline_teacher.py)

Storage is measured on disk: the teacher columns alone (`teacher_topk_*`, `teacher_rest_logprobs`,
`teacher_token_ids`) saved as an Arrow dataset, divided by the completion tokens. Each training variant runs in a
fresh process (peak RSS is per process): it loads the teacher (or nothing, for the stored teacher) and the student,
then trains GKDVariant off-policy (lmbda=0, forward KL over the teacher's top-k plus the rest bucket); peak memory is
the resident-set high-water mark above the process's memory before the teacher was loaded, so it counts the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from _common import PeakMemory, launch_worker, make_word_tokenizer, mib, random_words, trainer_args

SIZES = {
    # vocabulary, teacher (hidden, layers), student (hidden, layers), rows, words per completion, steps, batch
    "tiny": dict(vocab=512, teacher=(64, 2), student=(32, 1), rows=16, words=8, steps=2, batch=4, ks=[4, 16]),
    "default": dict(vocab=8000, teacher=(512, 6), student=(128, 2), rows=96, words=40, steps=12, batch=8,
                    ks=[8, 64, 256]),
}
TOP_K = 64  # the training comparison's k (the tiny size uses its largest k)
VARIANTS = ("stored", "live_4bit", "live_fp32")


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write the storage/memory plot (PNG) here")
    parser.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _setup(size: dict, workdir: Path):
    """Tokenizer, teacher and student saved under `workdir` (the workers load them from there), and the data."""
    from datasets import Dataset

    from trl_distill.testing import tiny_causal_lm

    tokenizer = make_word_tokenizer(size["vocab"])
    if not (workdir / "teacher").exists():
        (hidden, layers), (s_hidden, s_layers) = size["teacher"], size["student"]
        length = 2 * size["words"] + 16
        teacher = tiny_causal_lm(tokenizer, hidden, layers, num_heads=4, seed=1, max_position_embeddings=length)
        student = tiny_causal_lm(tokenizer, s_hidden, s_layers, num_heads=2, seed=2, max_position_embeddings=length)
        for name, model in (("teacher", teacher), ("student", student)):
            model.save_pretrained(workdir / name)
            tokenizer.save_pretrained(workdir / name)
    rng = random.Random(0)
    rows = [{"messages": [{"role": "user", "content": random_words(rng, size["vocab"], size["words"])},
                          {"role": "assistant", "content": random_words(rng, size["vocab"], size["words"])}]}
            for _ in range(size["rows"])]
    return tokenizer, Dataset.from_list(rows)


def _directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure_storage_and_scoring(size: dict, workdir: Path) -> dict:
    from trl_distill.offline_teacher import TEACHER_COLUMNS, score_dataset, storage_bytes_per_token

    tokenizer, data = _setup(size, workdir)
    results = []
    for k in size["ks"]:
        output = workdir / f"top{k}"
        start = time.perf_counter()
        scored = score_dataset(str(workdir / "teacher"), tokenizer, data, output, top_k=k, batch_size=size["batch"],
                               shard_size=max(1, size["rows"] // 2), max_length=1024, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(len(row) for row in scored["teacher_token_ids"])
        columns_only = workdir / f"top{k}_columns"
        scored.select_columns(list(TEACHER_COLUMNS)).save_to_disk(str(columns_only))
        results.append({"k": k, "tokens": tokens, "bytes_per_token": _directory_bytes(columns_only) / tokens,
                        "formula_bytes_per_token": storage_bytes_per_token(k),
                        "dense_fp32_bytes_per_token": 4 * size["vocab"],
                        "scoring_tokens_per_s": tokens / seconds, "scoring_seconds": seconds})
    return {"storage": results}


def train_worker(size: dict, workdir: Path, variant: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from trl_distill import GKDVariant, GKDVariantConfig
    from trl_distill.offline_teacher import load_teacher_topk
    from trl_distill.teacher import load_teacher

    tokenizer, data = _setup(size, workdir)
    k = TOP_K if TOP_K in size["ks"] else max(size["ks"])
    student = AutoModelForCausalLM.from_pretrained(workdir / "student")
    stored = load_teacher_topk(workdir / f"top{k}") if variant == "stored" else None
    memory = PeakMemory("cpu")
    memory.start()  # before the teacher is loaded: its weights count
    teacher = None
    if variant != "stored":
        teacher = load_teacher(str(workdir / "teacher"), quantization="4bit" if variant == "live_4bit" else None)
    config = GKDVariantConfig(**trainer_args(str(workdir / f"run_{variant}"), size["steps"], size["batch"], 1e-4, 0),
                              lmbda=0.0, loss_type="forward_kl", teacher_top_k=k, max_length=1024)
    trainer = GKDVariant(model=student, teacher_model=teacher, args=config, processing_class=tokenizer,
                         train_dataset=stored if variant == "stored" else data)
    tokens = sum(len(row) for row in (stored or load_teacher_topk(workdir / f"top{k}"))["teacher_token_ids"])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trained_tokens = tokens * size["steps"] * size["batch"] / size["rows"]  # completion tokens seen, on average
    return {"variant": variant, "k": k, "peak_mib": mib(memory.stop()), "train_seconds": seconds,
            "tokens_per_s": trained_tokens / seconds}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    storage = results["storage"]
    left.plot([r["k"] for r in storage], [r["bytes_per_token"] for r in storage], "o-", label="measured (Arrow)")
    left.plot([r["k"] for r in storage], [r["formula_bytes_per_token"] for r in storage], "x--", label="8k + 8")
    left.set(xscale="log", yscale="log", xlabel="k", ylabel="bytes per completion token",
             title="stored teacher size")
    left.legend()
    runs = results["training"]
    right.bar([r["variant"] for r in runs], [r["peak_mib"] for r in runs])
    right.set(ylabel="peak training memory (MiB above baseline)", title=f"GKD training, top-{runs[0]['k']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main(argv=None) -> dict:
    args = parse(argv)
    size = SIZES[args.size]
    if args.worker:
        print(json.dumps(train_worker(size, Path(args.workdir), args.worker)))
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        results = {"size": args.size, **{key: value for key, value in size.items() if key != "ks"}}
        results.update(measure_storage_and_scoring(size, workdir))
        results["training"] = [launch_worker(__file__, ["--size", args.size, "--workdir", str(workdir)], variant)
                               for variant in VARIANTS]
    stored = results["training"][0]
    for run in results["training"]:
        run["peak_vs_stored"] = run["peak_mib"] / max(stored["peak_mib"], 1e-9)
        run["tokens_per_s_vs_stored"] = run["tokens_per_s"] / stored["tokens_per_s"]
    print(json.dumps(results, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    if args.plot:
        plot(results, args.plot)
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
