"""One-command GPU check: every trainer for a few steps on Qwen-shaped models, ours and TRL's side by side.

    python benchmarks/gpu_check.py                          # CUDA, Qwen-shaped models, about 3-6 minutes on an H200
    python benchmarks/gpu_check.py --rows gkd_on trl_distillation   # a subset
    python benchmarks/gpu_check.py --device cpu --tiny      # smoke size on the CPU (what the test suite runs)

Everything is built offline (no Hub): a word-level tokenizer with exactly 151,936 entries (Qwen2's vocabulary size)
and a chat template, a student and a teacher built from `Qwen2Config` with random weights (student: Qwen2.5-0.5B's
shape, teacher: Qwen2.5-1.5B's shape), saved once under ``--work-dir`` and loaded by every row. On CUDA the student
trains in bf16 (`dtype=bfloat16`, `bf16=True`) and the teacher is loaded in 4-bit nf4 (bitsandbytes) by the trainer
under test, as a user's run would load it (``--no-teacher-4bit`` loads it in bf16 instead, e.g. where bitsandbytes has
no build for the machine's CUDA). ``--tiny`` uses a 256-word vocabulary and 2-layer models and, on the CPU, fp32 and
an unquantized teacher (``--teacher-4bit`` forces 4-bit); ``--size compare`` is benchmarks/onpolicy_vs_trl.py's CPU
size (32,000 words, 2-layer models). Every on-policy row samples at temperature 1 (DistillationTrainer's default).

Rows (``--rows``; all by default):

* ``gkd_off`` / ``gkd_on``: `GKDVariant`, ``lmbda=0`` (dataset completions) / ``lmbda=1`` (the student samples every
  step with HF ``generate``), loss jsd (beta 0.5);
* ``gkd_on_vllm``: as ``gkd_on`` with ``use_vllm=True`` (colocate), only when `vllm` is importable;
* ``okd`` (`OKDTrainer`, online LoRA module on the 4-bit teacher), ``distill_dpo`` (`DistillDPOTrainer`, the teacher
  as reference), ``adpo`` (`ADPOTrainer`, lists of 4, the teacher as anchor), ``redi`` (`REDITrainer`, no teacher);
* ``trl_gkd``: TRL's `GKDTrainer` (``lmbda=1``, beta 0.5), the same 4-bit teacher; ``trl_distillation``: TRL's
  `DistillationTrainer` (always on-policy, beta 0.5 = jsd); ``trl_distillation_vllm`` with ``use_vllm=True``
  (when `vllm` is importable); ``trl_gkd_liger`` / ``trl_distillation_liger`` with ``use_liger_kernel=True`` (when
  `liger_kernel` is importable).

Each row runs in a fresh Python process (``--in-process`` runs them in this one, for tests) with its own time limit
(``--row-timeout``) inside an overall budget (``--budget``, default 400 s of rows): a row that fails, times out or
is left without time is reported as such in the table and the next row runs. Per row:

* tokens/s: non-padding tokens of the micro-batches the loss is computed on (on-policy batches counted as generated,
  a preference row counts every completion) during the steps after the first (``--warmup-steps``), over their wall
  time (CUDA synchronized), generation included;
* peak memory: ``torch.cuda.max_memory_allocated()`` over the whole row (models, optimizer, steps), or on the CPU the
  process's resident-set high-water mark over its RSS before the models are loaded;
* loss finite: every logged training loss (``logging_steps=1``) is finite.

Writes ``<output-dir>/gpu_check.json`` (rows, settings, package versions) and prints the table as markdown.

Packages: torch with CUDA, transformers, trl (1.16), peft, datasets, accelerate, bitsandbytes (the 4-bit teacher);
optionally vllm and liger-kernel. ``--check-packages`` prints what is importable and exits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # trl_distill from this checkout

from _common import make_word_tokenizer, offline_env, random_words  # noqa: E402

offline_env()

QWEN_VOCAB = 151_936
# Qwen2.5-0.5B-Instruct's and Qwen2.5-1.5B-Instruct's shapes (config.json of each), random weights.
SHAPES = {
    "student": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2),
    "teacher": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                    num_key_value_heads=2),
}
COMPARE_SHAPES = {  # benchmarks/onpolicy_vs_trl.py's CPU comparison
    "student": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "teacher": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
}
TINY_SHAPES = {
    "student": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
    "teacher": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2),
}
# vocabulary, batch, prompt words, completion words (dataset completions and max_new_tokens)
SIZES = {
    "full": dict(vocab=QWEN_VOCAB, batch=4, prompt=128, completion=128),
    "tiny": dict(vocab=256, batch=2, prompt=6, completion=6),
    "compare": dict(vocab=32_000, batch=4, prompt=32, completion=64),
}
SHAPES_OF = {"full": SHAPES, "tiny": TINY_SHAPES, "compare": COMPARE_SHAPES}

ROWS = {  # the optional rows (vLLM, Liger) last, so that a tight budget still leaves the comparison itself
    "gkd_off": "GKDVariant off-policy (lmbda=0)",
    "gkd_on": "GKDVariant on-policy (lmbda=1, HF generate)",
    "okd": "OKDTrainer (online LoRA teacher module)",
    "distill_dpo": "DistillDPOTrainer (teacher reference)",
    "adpo": "ADPOTrainer (K=4, teacher anchor)",
    "redi": "REDITrainer",
    "trl_gkd": "TRL GKDTrainer (lmbda=1)",
    "trl_distillation": "TRL DistillationTrainer (jsd)",
    "gkd_on_vllm": "GKDVariant on-policy (lmbda=1, vLLM colocate)",
    "trl_distillation_vllm": "TRL DistillationTrainer (jsd, vLLM colocate)",
    "trl_gkd_liger": "TRL GKDTrainer (lmbda=1, Liger)",
    "trl_distillation_liger": "TRL DistillationTrainer (jsd, Liger)",
}
NEEDS = {  # row -> optional package it needs; without it the row is reported as skipped
    "gkd_on_vllm": "vllm",
    "trl_distillation_vllm": "vllm",
    "trl_gkd_liger": "liger_kernel",
    "trl_distillation_liger": "liger_kernel",
}
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes", "vllm", "liger_kernel")
COLUMNS = ("row", "status", "tokens_per_s", "peak_mib", "loss_finite", "first_loss", "last_loss", "seconds")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="256-word vocabulary, 2-layer models (smoke size)")
    parser.add_argument("--size", choices=list(SIZES), default=None,
                        help="full (default), tiny (= --tiny) or compare (CPU comparison: V=32000, 2-layer models)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads of each row")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per row (default 4, tiny 2)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="first steps left out of tokens/s")
    parser.add_argument("--teacher-4bit", action=argparse.BooleanOptionalAction, default=None,
                        help="load the teacher in 4-bit nf4 (default: on CUDA yes, on the CPU no)")
    parser.add_argument("--in-process", action="store_true", help="run the rows in this process (tests)")
    parser.add_argument("--row-timeout", type=float, default=150.0, help="seconds one row may take (subprocess)")
    parser.add_argument("--budget", type=float, default=400.0,
                        help="seconds for all rows; rows left without time are reported as skipped")
    parser.add_argument("--work-dir", default="outputs/gpu_check/models", help="where the built models are saved")
    parser.add_argument("--output-dir", default="outputs/gpu_check")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-packages", action="store_true", help="print package versions and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # one row in this process, JSON on stdout
    args = parser.parse_args(argv)
    size = args.size or ("tiny" if args.tiny else "full")
    args.tiny = size == "tiny"
    if args.steps is None:
        args.steps = 2 if args.tiny else 4
    if args.teacher_4bit is None:
        args.teacher_4bit = args.device == "cuda"
    if args.steps <= args.warmup_steps:
        parser.error(f"--steps ({args.steps}) must exceed --warmup-steps ({args.warmup_steps}).")
    args.size = size
    return args


# ---------------------------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------------------------


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
            versions[name] = getattr(module, "__version__", "installed")
        except Exception as error:  # noqa: BLE001 - a broken install is reported like a missing one
            versions[name] = None if isinstance(error, ImportError) else f"import error: {error}"
    return versions


def device_info(device: str) -> str:
    import torch

    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: --device cuda but torch.cuda.is_available() is False (use --device cpu).")
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


# ---------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------


def build_assets(cli) -> Path:
    """Save the tokenizer, the student and the teacher (random Qwen2 weights) under ``--work-dir``, once."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    size = SIZES[cli.size]
    root = Path(cli.work_dir) / f"{cli.size}_seed{cli.seed}"
    done = root / "done.json"
    if done.exists():
        return root
    shapes = SHAPES_OF[cli.size]
    tokenizer = make_word_tokenizer(size["vocab"])
    dtype = torch.float32 if cli.device == "cpu" else torch.bfloat16
    for offset, role in enumerate(("student", "teacher")):
        torch.manual_seed(cli.seed + offset)
        config = Qwen2Config(
            vocab_size=size["vocab"], max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            **shapes[role],
        )
        # Built where it will run (fast random init on a GPU), saved in the dtype it trains in.
        with torch.device(cli.device):
            model = Qwen2ForCausalLM(config).to(dtype)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(root / role)
        tokenizer.save_pretrained(root / role)  # for vLLM, which loads the tokenizer from the model's directory
        n = sum(p.numel() for p in model.parameters())
        print(f"[gpu_check] built {role}: {n / 1e6:.1f}M parameters ({dtype}), saved to {root / role}", flush=True)
        del model
    # transformers 5's AutoTokenizer picks the class from a directory's model config (qwen2 -> Qwen2Tokenizer, which
    # rebuilds a byte-level BPE and loses the word vocabulary): the script loads its own copy from a model-less one.
    tokenizer.save_pretrained(root / "tokenizer")
    done.write_text(json.dumps({"size": cli.size, "seed": cli.seed}))
    if cli.device == "cuda":
        torch.cuda.empty_cache()  # the rows run in other processes: hand the built models' memory back
    return root


def datasets_for(cli, tokenizer_vocab: int):
    """Random-word conversations in each format the trainers read, the same prompts everywhere."""
    from datasets import Dataset

    size = SIZES[cli.size]
    rng = random.Random(cli.seed)
    n = size["batch"] * (cli.steps + 1)
    prompts = [random_words(rng, tokenizer_vocab, size["prompt"]) for _ in range(n)]
    answers = [[random_words(rng, tokenizer_vocab, size["completion"]) for _ in range(4)] for _ in range(n)]

    def user(text):
        return [{"role": "user", "content": text}]

    def assistant(text):
        return [{"role": "assistant", "content": text}]

    return {
        "messages": Dataset.from_list([{"messages": user(p) + assistant(a[0])} for p, a in zip(prompts, answers)]),
        "prompt_completion": Dataset.from_list(
            [{"prompt": user(p), "completion": assistant(a[0])} for p, a in zip(prompts, answers)]
        ),
        "prompt": Dataset.from_list([{"prompt": user(p)} for p in prompts]),
        "pairs": Dataset.from_list(
            [{"prompt": user(p), "chosen": assistant(a[0]), "rejected": assistant(a[1])} for p, a in zip(prompts, answers)]
        ),
        "lists": Dataset.from_list(
            [{"prompt": user(p), "completions": [assistant(x) for x in a], "rewards": [1.0, 0.0, 0.0, 0.0]}
             for p, a in zip(prompts, answers)]
        ),
    }


# ---------------------------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------------------------


def batch_tokens(inputs) -> int:
    """Non-padding tokens of a batch in any of the trainers' layouts."""
    if "attention_mask" in inputs:
        return int((inputs["attention_mask"] != 0).sum())
    keys = [key for key in ("prompt_mask", "completion_mask") if key in inputs]
    if keys:
        return int(sum((inputs[key] != 0).sum() for key in keys))
    keys = [key for key in inputs if key.endswith("attention_mask")]
    return int(sum((inputs[key] != 0).sum() for key in keys))


def counting(base: type, counts: list) -> type:
    class Counting(base):
        def compute_loss(self, model, inputs, *rest, **kwargs):
            if model.training:
                counts.append((self.state.global_step, batch_tokens(inputs)))
            return super().compute_loss(model, inputs, *rest, **kwargs)

    Counting.__name__ = Counting.__qualname__ = f"Counting{base.__name__}"
    return Counting


def step_timer(device: str, warmup: int):
    """A callback timing the optimizer steps after the first `warmup` ones (CUDA synchronized at both ends)."""
    import torch
    from transformers import TrainerCallback

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    class StepTimer(TrainerCallback):
        seconds = 0.0
        start = None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step >= warmup:
                sync()
                self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.start is not None:
                sync()
                self.seconds += time.perf_counter() - self.start
                self.start = None

    return StepTimer()


def common_args(cli, row: str) -> dict:
    cuda = cli.device == "cuda"
    return dict(
        output_dir=str(Path(cli.output_dir) / "runs" / row),
        max_steps=cli.steps,
        per_device_train_batch_size=SIZES[cli.size]["batch"],
        learning_rate=1e-5,
        seed=cli.seed,
        bf16=cuda,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        logging_steps=1,
        use_cpu=not cuda,
    )


def build_trainer(row: str, cli, assets: Path, counts: list):
    """The trainer of `row`, wrapped to count its tokens, on the saved student and teacher."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = SIZES[cli.size]
    student_path, teacher_path = str(assets / "student"), str(assets / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(str(assets / "tokenizer"))
    data = datasets_for(cli, len(tokenizer))
    args = common_args(cli, row)
    dtype = torch.bfloat16 if cli.device == "cuda" else torch.float32
    quantization = "4bit" if cli.teacher_4bit else None
    teacher_kwargs = {"dtype": dtype}
    max_length = 2 * (size["prompt"] + size["completion"]) + 16

    def student():
        return AutoModelForCausalLM.from_pretrained(student_path, dtype=dtype).to(cli.device)

    def loaded_teacher():
        from trl_distill.teacher import load_teacher

        return load_teacher(teacher_path, quantization=quantization, model_init_kwargs=teacher_kwargs,
                            device=cli.device)

    vllm_args = dict(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=0.25,
                     vllm_max_model_length=max_length)

    if row.startswith("gkd"):
        from trl_distill import GKDVariant, GKDVariantConfig

        extra = vllm_args if row == "gkd_on_vllm" else {}
        config = GKDVariantConfig(  # temperature 1: DistillationTrainer's, so that every on-policy row samples alike
            **args, lmbda=0.0 if row == "gkd_off" else 1.0, beta=0.5, loss_type="jsd", temperature=1.0,
            max_new_tokens=size["completion"], max_length=max_length, teacher_quantization=quantization,
            teacher_model_init_kwargs=teacher_kwargs, **extra,
        )
        return counting(GKDVariant, counts)(model=student(), teacher_model=teacher_path, args=config,
                                            train_dataset=data["messages"], processing_class=tokenizer)
    if row == "okd":
        from trl_distill.trainers.okd import OKDConfig, OKDTrainer

        config = OKDConfig(**args, teacher_update="online", alpha=0.1, max_length=max_length,
                           teacher_quantization=quantization, teacher_model_init_kwargs=teacher_kwargs)
        return counting(OKDTrainer, counts)(model=student(), teacher_model=teacher_path, args=config,
                                            train_dataset=data["prompt_completion"], processing_class=tokenizer)
    if row == "distill_dpo":
        from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer

        config = DistillDPOConfig(**args, mode="teacher_ref", beta=0.1, max_length=max_length,
                                  teacher_quantization=quantization, teacher_model_init_kwargs=teacher_kwargs)
        return counting(DistillDPOTrainer, counts)(model=student(), teacher_model=teacher_path, args=config,
                                                   train_dataset=data["pairs"], processing_class=tokenizer)
    if row == "adpo":
        from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer

        config = ADPOConfig(**args, anchor="teacher", max_length=max_length, teacher_quantization=quantization,
                            teacher_model_init_kwargs=teacher_kwargs)
        return counting(ADPOTrainer, counts)(model=student(), teacher_model=teacher_path, args=config,
                                             train_dataset=data["lists"], processing_class=tokenizer)
    if row == "redi":
        from trl_distill.trainers.redi import REDIConfig, REDITrainer

        config = REDIConfig(**args, alpha=0.8, max_length=max_length)
        return counting(REDITrainer, counts)(model=student(), args=config, train_dataset=data["pairs"],
                                             processing_class=tokenizer)
    if row.startswith("trl_gkd"):
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        config = GKDConfig(**args, lmbda=1.0, beta=0.5, temperature=1.0, max_new_tokens=size["completion"],
                           max_length=max_length,
                           use_liger_kernel=row.endswith("liger"))
        return counting(GKDTrainer, counts)(model=student(), teacher_model=loaded_teacher(), args=config,
                                            train_dataset=data["messages"], processing_class=tokenizer)
    if row.startswith("trl_distillation"):
        from trl import DistillationConfig, DistillationTrainer

        left = AutoTokenizer.from_pretrained(str(assets / "tokenizer"), padding_side="left")  # DistillationTrainer's requirement
        extra = vllm_args if row.endswith("vllm") else {}
        config = DistillationConfig(**args, beta=0.5, max_completion_length=size["completion"],
                                    use_liger_kernel=row.endswith("liger"), **extra)
        return counting(DistillationTrainer, counts)(model=student(), teacher_model=loaded_teacher(), args=config,
                                                     train_dataset=data["prompt"], processing_class=left)
    raise ValueError(f"unknown row {row!r}")


def import_trainers() -> None:
    """Import every trainer a row can build (the same modules for every row)."""
    import trl_distill.trainers.adpo  # noqa: F401
    import trl_distill.trainers.distill_dpo  # noqa: F401
    import trl_distill.trainers.gkd  # noqa: F401
    import trl_distill.trainers.okd  # noqa: F401
    import trl_distill.trainers.redi  # noqa: F401
    from trl import DistillationTrainer  # noqa: F401
    from trl.experimental.gkd import GKDTrainer  # noqa: F401


def run_row(row: str, cli, assets: Path) -> dict:
    """Train `row` for ``--steps`` steps; tokens/s, peak memory and the logged losses (raises on failure)."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import PeakMemory

    cuda = cli.device == "cuda"
    if cuda:
        torch.cuda.empty_cache()
    if cli.threads:
        torch.set_num_threads(cli.threads)
    import_trainers()  # before the memory baseline, so that no row's peak counts imports
    memory = PeakMemory(cli.device)
    memory.start()
    if cuda:
        memory.baseline = 0  # the row's whole footprint: max_memory_allocated itself
    counts: list = []
    started = time.perf_counter()
    trainer = build_trainer(row, cli, assets, counts)
    timer = step_timer(cli.device, cli.warmup_steps)
    trainer.add_callback(timer)
    trainer.train()
    peak = memory.stop()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    tokens = sum(n for step, n in counts if step >= cli.warmup_steps)
    result = {
        "row": row,
        "status": "ok",
        "tokens": tokens,
        "timed_seconds": timer.seconds,
        "tokens_per_s": tokens / timer.seconds if timer.seconds > 0 and tokens else float("nan"),
        "peak_mib": peak / 2**20,
        "losses": losses,
        "loss_finite": bool(losses) and all(math.isfinite(x) for x in losses),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "seconds": time.perf_counter() - started,
    }
    del trainer
    return result


def failed(row: str, status: str, error: str = "", seconds: float = 0.0) -> dict:
    return {"row": row, "status": status, "error": error, "tokens_per_s": float("nan"), "peak_mib": float("nan"),
            "loss_finite": False, "first_loss": None, "last_loss": None, "seconds": seconds}


def run_isolated(row: str, cli, argv: list[str], timeout: float) -> dict:
    """`row` in a fresh process (``--worker``), killed after `timeout` seconds; failures become a row."""
    command = [sys.executable, os.path.abspath(__file__), *argv, "--worker", row]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return failed(row, "timeout", f"killed after {timeout:.0f} s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    lines = result.stdout.strip().splitlines()
    if result.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (result.stderr or result.stdout)[-3000:]
    return failed(row, f"error (exit {result.returncode})", tail, seconds)


def worker(cli) -> None:
    assets = build_assets(cli)
    try:
        result = run_row(cli.worker, cli, assets)
    except Exception as error:  # noqa: BLE001 - reported in the table by the parent
        result = failed(cli.worker, f"error: {type(error).__name__}", traceback.format_exc()[-3000:])
    print(json.dumps(result, default=float))


# ---------------------------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------------------------


def fmt(value, digits=1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.{digits}f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| row | trainer | status | tokens/s | peak memory (MiB) | loss finite | first loss | last loss | row time (s) |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        finite = fmt(r["loss_finite"]) if r["status"] == "ok" else "-"
        lines.append(
            f"| {r['row']} | {ROWS[r['row']]} | {r['status']} | {fmt(r['tokens_per_s'])} | {fmt(r['peak_mib'])} | "
            f"{finite} | {fmt(r['first_loss'], 4)} | {fmt(r['last_loss'], 4)} | {fmt(r['seconds'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    cli = parse_args(argv)
    if cli.worker:
        worker(cli)
        return {}
    versions = package_versions()
    print("[gpu_check] packages: " + ", ".join(f"{k} {v or '-'}" for k, v in versions.items()), flush=True)
    if cli.check_packages:
        return {"packages": versions}
    started = time.perf_counter()
    device = device_info(cli.device)
    print(f"[gpu_check] device: {device}; size {cli.size}; {cli.steps} steps per row; teacher "
          f"{'4-bit nf4' if cli.teacher_4bit else 'unquantized'}", flush=True)
    assets = build_assets(cli)
    print(f"[gpu_check] models ready after {time.perf_counter() - started:.0f} s", flush=True)

    rows = []
    budget_end = time.perf_counter() + cli.budget
    for row in cli.rows:
        needed = NEEDS.get(row)
        if needed and (versions[needed] is None or str(versions[needed]).startswith("import error")):
            rows.append(failed(row, f"skipped: {needed} not importable"))
        else:
            left = budget_end - time.perf_counter()
            if left < 10:
                rows.append(failed(row, "skipped: time budget spent"))
            elif cli.in_process:
                row_start = time.perf_counter()
                try:
                    rows.append(run_row(row, cli, assets))
                except Exception as error:  # noqa: BLE001 - one failing row must not stop the others
                    rows.append(failed(row, f"error: {type(error).__name__}", traceback.format_exc()[-3000:],
                                       time.perf_counter() - row_start))
            else:
                rows.append(run_isolated(row, cli, argv, timeout=min(cli.row_timeout, left)))
        r = rows[-1]
        finite = fmt(r["loss_finite"]) if r["status"] == "ok" else "-"
        print(f"[gpu_check] {row}: {r['status']}, {fmt(r['tokens_per_s'])} tokens/s, {fmt(r['peak_mib'])} MiB, "
              f"loss finite {finite}, {fmt(r['seconds'])} s", flush=True)
        if r["status"] != "ok" and r.get("error"):
            print("    " + r["error"].strip().splitlines()[-1][:300], flush=True)

    table = markdown_table(rows)
    results = {
        "settings": {**{k: v for k, v in vars(cli).items() if k != "worker"}, **SIZES[cli.size]},
        "device": device,
        "packages": versions,
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    print(f"[gpu_check] {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} rows ok in "
          f"{results['total_seconds']:.0f} s; wrote {out / 'gpu_check.json'}", flush=True)
    return results


if __name__ == "__main__":
    main()
