"""Which method gives the better student? Every trainer on a task whose true distribution is known (SPEC section 10).

    python benchmarks/quality.py                          # the default run (size "small", 5 seeds, 9 core methods:
                                                          # 23 minutes on 2 CPU cores)
    python benchmarks/quality.py --methods all            # every method of the table (hours on 2 CPU cores)
    python benchmarks/quality.py --methods gkd_forward_kl_l0 sft --seeds 0 1 2 3 4
    python benchmarks/quality.py --merge                  # tables, JSON and plots from the runs done so far
    python benchmarks/quality.py --quick                  # smoke run: tiny models, 3 steps, every method

The task (`trl_distill.hmm_task`): a random sparse HMM over 64 words; a prompt is 8 words, a completion the next
32 words then ``<|end|>``. p*(y | x) is exact (forward algorithm), so two metrics are exact, not judged:

* forward KL(p* || student) per completion token, on 1,000 held-out samples of p* (lower is better);
* validity: the fraction of the student's own completions to 500 held-out prompts with p*(y | x) > 0, sampled at
  temperature 1 (seeded) and greedy (higher is better).

Set-up, the same for every method (nothing is tuned per method):

* teacher: 4 layers x 128 (1.07M parameters), trained once on 64,000 fresh samples of p* and cached
  (`trl_distill.testing.pretrained_hmm_teacher`); its KL to p* and validity are printed with every table;
* student: 2 layers x 48 (about 80k parameters, 13x smaller), fresh from the seed; 2,000 (prompt, one sampled
  completion) training pairs drawn from the seed (a limited set, where soft targets have something to add);
* every method: the same optimizer steps and batch of prompts, AdamW, cosine schedule with 5% warm-up, clipping
  at 1, fp32. Learning rates come from two grids, the same for every method of a group: ``--learning-rates`` for
  training from a fresh student (default 3e-3) and ``--continued-learning-rates`` for continuing from the seed's
  SFT student (default 3e-4: the preference methods, and every method under ``--student-start sft``; the SFT
  student is the ``sft`` run at ``--sft-start-lr``, default 3e-3). The tables report every grid point run and the
  summary picks, per method, the point with the lower mean KL, as stated beside it;
* on-policy sampling (GKD ``lmbda > 0``, TRL's GKD and DistillationTrainer) at temperature 1 with room for the
  32 words and the end token.

Methods (``--methods``; ``core`` is the default set, ``all`` everything):

* from a fresh student: ``sft`` (TRL `SFTTrainer`), ``seqkd`` (sequence-level KD: `SFTTrainer` on one teacher
  sample per training prompt), ``gkd_<loss>_l<lmbda>`` (`GKDVariant`, each divergence of `trl_distill.losses`,
  ``lmbda`` 0 = off-policy, 0.5 = TRL's default, 1 = on-policy; ``gkd_forward_kl_l0`` is frozen-teacher KD),
  ``trl_gkd`` (TRL `GKDTrainer`: lmbda 0.5, beta 0.5), ``trl_distillation`` (TRL 1.16 `DistillationTrainer`,
  on-policy, beta 0.5: JSD), ``okd_a<alpha>`` (`OKDTrainer`, alpha 0.1 / 0.3 / 0.5);
* from the seed's SFT student (the ``sft`` run at the same learning rate), on preference data built from that
  student's own samples (4 per training prompt at temperature 1, reward = validity; prompts with both a valid and an
  invalid sample make a pair, chosen = the first valid, rejected = the first invalid): ``dpo`` (TRL `DPOTrainer`,
  the SFT student as reference), ``ddpo_teacher_ref`` / ``ddpo_dckd`` / ``ddpo_adpa`` (`DistillDPOTrainer`; ADPA's
  aligned teacher is the teacher plus a LoRA adapter trained with TRL's DPO on the teacher's own valid/invalid
  samples, adapter off = its reference; ``ddpo_adpa_k5``: ADPA with ``teacher_top_k=5`` instead of the authors' 50,
  a top-k scaled to this 69-token vocabulary, docs/benchmarks.md), ``adpo_fixed`` / ``adpo_ema`` (`ADPOTrainer` on
  the lists of 4 with their validity rewards), ``redi`` (`REDITrainer`, alpha 0.8) and ``sft_pos`` (continued
  `SFTTrainer` on the chosen samples only: REDI's baseline).

Each (method, seed, learning rate) runs in a fresh process (``--jobs`` at a time, one torch thread each), forked
from a server that imported torch, transformers and TRL once, and appends one JSON line to
``<output-dir>/runs.jsonl``; its output goes to ``<output-dir>/runs/<run>/worker.log``. A run already there is not
repeated, so a long sweep can be stopped and continued. A continued method waits only for its own seed's sft run;
the preference data of a seed's start is drawn once and kept in ``<output-dir>/preference_data/``. Train time,
tokens/s (non-padding tokens the student reads, as in run_all.py) and peak memory (CPU RSS high-water mark over the
worker's RSS before its models) are measured around `trainer.train()` with the periodic evaluations left out; with
``--jobs 2`` the two workers share the CPU, so times are comparable between methods of one sweep, not absolute.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling helpers, also when imported

from _common import PeakMemory, counting, mib, trainer_args  # noqa: E402

from trl_distill.losses import LOSS_TYPES  # noqa: E402

LMBDAS = (0.0, 0.5, 1.0)
GKD_METHODS = tuple(f"gkd_{loss}_l{lmbda:g}" for loss in LOSS_TYPES for lmbda in LMBDAS)
OKD_METHODS = ("okd_a0.1", "okd_a0.3", "okd_a0.5")
DISTILL_METHODS = ("sft", "seqkd", *GKD_METHODS, "trl_gkd", "trl_distillation", *OKD_METHODS)
PREFERENCE_METHODS = ("dpo", "ddpo_teacher_ref", "ddpo_dckd", "ddpo_adpa", "ddpo_adpa_k5", "adpo_fixed", "adpo_ema",
                      "redi", "sft_pos")
ALL_METHODS = DISTILL_METHODS + PREFERENCE_METHODS
# The default run: the headline comparisons (KD against SFT, on- against off-policy, OKD, the preference trainers
# against DPO and REDI's baseline), 5 seeds each: 45 runs of 20 s to 2 minutes, two at a time, 23 minutes on 2 idle
# CPU cores (benchmarks/results/quality_default_run.log).
CORE_METHODS = ("sft", "gkd_forward_kl_l0", "gkd_forward_kl_l1", "okd_a0.1", "dpo", "ddpo_dckd", "adpo_fixed", "redi",
                "sft_pos")
TEACHER_METHODS = ("seqkd", *GKD_METHODS, "trl_gkd", "trl_distillation", *OKD_METHODS, "ddpo_teacher_ref",
                   "ddpo_dckd", "ddpo_adpa", "ddpo_adpa_k5")

SIZES = {
    # smoke test: seconds per run, meaningless numbers
    "quick": dict(student="1x16", teacher="1x32", teacher_steps=20, steps=3, batch_size=4, n_train=32, n_kl=32,
                  n_valid=16, eval_every=3, seeds=(0,), learning_rates=(3e-3,), continued_learning_rates=(3e-3,),
                  sft_start_lr=3e-3, n_pref=16, teacher_dpo_steps=2),
    # the recorded CPU run (docs/benchmarks.md)
    "small": dict(student="2x48", teacher="4x128", teacher_steps=2000, steps=300, batch_size=32, n_train=2000,
                  n_kl=1000, n_valid=500, eval_every=100, seeds=(0, 1, 2, 3, 4), learning_rates=(3e-3,),
                  continued_learning_rates=(3e-4,), sft_start_lr=3e-3,
                  n_pref=2000, teacher_dpo_steps=100),
}
CURVE_KL, CURVE_VALID = 300, 200  # held-out samples / prompts of the curve points (the final point uses all)
WORKER_ENV = {"OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}  # one torch thread per worker process


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="size 'quick' (smoke test), every method, in-process")
    parser.add_argument("--size", default="small", choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=["core"],
                        help="method names, 'core' (default), 'all', 'distill' or 'preference'")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=None,
                        help="the grid of the methods that start from a fresh student (default: the size's)")
    parser.add_argument("--continued-learning-rates", type=float, nargs="+", default=None,
                        help="the grid of the methods that continue from the SFT student: the preference methods, and "
                             "every method under --student-start sft (default: the size's)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--student-start", default="fresh", choices=["fresh", "sft"],
                        help="where the distillation methods start: a fresh student (default) or the seed's sft run "
                             "at --sft-start-lr from --sft-dir (as GKD's paper starts from a supervised student)")
    parser.add_argument("--sft-dir", default=None, help="the output dir holding the sft runs (default: --output-dir)")
    parser.add_argument("--sft-start-lr", type=float, default=None,
                        help="continued methods start from the sft run at this learning rate (default: the size's)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes at a time (one torch thread each)")
    parser.add_argument("--output-dir", default=None, help="default outputs/quality_<size>")
    parser.add_argument("--plot-dir", default=None, help="where the PNGs go (default: docs/ for size small)")
    parser.add_argument("--merge", action="store_true", help="only aggregate the runs already in runs.jsonl")
    parser.add_argument("--in-process", action="store_true", help="run every method in this process")
    cli = parser.parse_args(argv)
    if cli.quick:
        cli.size, cli.in_process = "quick", True
        if cli.methods == ["core"]:
            cli.methods = ["all"]
    groups = {"core": CORE_METHODS, "all": ALL_METHODS, "distill": DISTILL_METHODS, "preference": PREFERENCE_METHODS}
    methods = []
    for name in cli.methods:
        for method in groups.get(name, (name,)):
            if method not in ALL_METHODS:
                parser.error(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)} or {', '.join(groups)}")
            if method not in methods:
                methods.append(method)
    cli.methods = methods
    cli.output_dir = cli.output_dir or f"outputs/quality_{cli.size}"
    return cli


def config_of(cli) -> dict:
    cfg = dict(SIZES[cli.size])
    cfg["seeds"] = tuple(cli.seeds) if cli.seeds is not None else cfg["seeds"]
    cfg["learning_rates"] = tuple(cli.learning_rates) if cli.learning_rates else cfg["learning_rates"]
    if cli.continued_learning_rates:
        cfg["continued_learning_rates"] = tuple(cli.continued_learning_rates)
    cfg["steps"] = cli.steps or cfg["steps"]
    cfg["eval_every"] = min(cfg["eval_every"], cfg["steps"])
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# The task, the models and the preference data (all deterministic from the seeds; cached where expensive)
# ---------------------------------------------------------------------------------------------------------------


def task():
    from trl_distill import hmm_task

    return hmm_task.TaskConfig()


def shape(spec: str) -> tuple[int, int]:
    layers, hidden = (int(x) for x in spec.split("x"))
    return layers, hidden


def load_teacher(cfg):
    from trl_distill.testing import pretrained_hmm_teacher

    layers, hidden = shape(cfg["teacher"])
    return pretrained_hmm_teacher(task(), steps=cfg["teacher_steps"], hidden_size=hidden, num_layers=layers)


def fresh_student(cfg, tokenizer, seed: int):
    from trl_distill.testing import tiny_causal_lm

    layers, hidden = shape(cfg["student"])
    return tiny_causal_lm(tokenizer, hidden_size=hidden, num_layers=layers, seed=seed)


def train_pairs(cfg, seed: int):
    from trl_distill import hmm_task

    return hmm_task.sample_pairs(task(), cfg["n_train"], "train", seed)


def eval_sets(cfg):
    """Held-out samples of p* for the KL and prompts for validity: the same for every seed and method."""
    return _eval_sets(cfg["n_kl"], cfg["n_valid"])


@functools.lru_cache(maxsize=2)
def _eval_sets(n_kl: int, n_valid: int):
    from trl_distill import hmm_task

    kl_prompts, kl_completions = hmm_task.sample_pairs(task(), n_kl, "eval")
    valid_prompts, _ = hmm_task.sample_pairs(task(), n_valid, "eval", seed=1)
    return kl_prompts, kl_completions, valid_prompts


def measure(model, cfg, seed: int, full: bool = True) -> dict:
    """Forward KL to p* and validity (temperature 1 with a generator seeded by ``seed``, and greedy)."""
    import torch

    from trl_distill import hmm_task

    kl_prompts, kl_completions, valid_prompts = eval_sets(cfg)
    if not full:
        kl_prompts, kl_completions, valid_prompts = kl_prompts[:CURVE_KL], kl_completions[:CURVE_KL], valid_prompts[
            :CURVE_VALID]
    generator = torch.Generator().manual_seed(10_000 + seed)
    return {
        "forward_kl": hmm_task.forward_kl(model, task(), kl_prompts, kl_completions),
        "validity": hmm_task.validity(model, task(), valid_prompts, generator),
        "validity_greedy": hmm_task.validity(model, task(), valid_prompts),
    }


def weights_sha(model) -> str:
    """A fingerprint of a model's weights (sha256 of its state dict's bytes)."""
    import hashlib

    return hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values())).hexdigest()


def cpu_name() -> str:
    """The CPU's model name: runs on different CPUs differ in the last bits, and a teacher trained for 2,000 steps on
    another CPU is another teacher, so every row says where it ran (and which teacher it learned from)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_dir(output_dir: str, method: str, seed: int, lr: float) -> Path:
    return Path(output_dir) / "runs" / f"{method}_s{seed}_lr{lr:g}"


def teacher_samples(cfg, teacher, prompts, seed: int) -> list[str]:
    """One teacher completion per prompt at temperature 1 (sequence-level KD's data), decoded to words."""
    import torch

    from trl_distill import hmm_task

    tokens = hmm_task.sample_completions(teacher, task(), prompts, torch.Generator().manual_seed(20_000 + seed))
    return [hmm_task.decode_words(row, task().n_words) for row in tokens.tolist()]


def preference_data(cfg, model, seed: int, cache_dir: str | None = None, k: int = 4) -> dict:
    """Pairs, lists and positives from ``model``'s own samples (k per training prompt, reward = validity).

    A prompt with at least one invalid sample makes a pair: chosen = its first valid sample, rejected = its first
    invalid one. When none of the k samples is valid, the chosen is the prompt's training completion (a sample of
    p*), and the list's first sample is replaced by it; ``chosen_from_data`` reports how often (a student far from
    p*, as in the smoke run). Prompts whose k samples are all valid teach no preference and are left out, and so are
    prompts with an empty sample (the end token first), which the trainers refuse as data; ``n_pairs`` counts the
    prompts kept. With ``cache_dir`` the data is kept in ``<cache_dir>/preference_data/`` and read back by every
    later call with the same start, seed and sizes.
    """
    import hashlib

    from datasets import Dataset

    # Every preference method of a seed draws the same data from the same start: drawn once, kept under a key of
    # everything it depends on (the start's weights, the task, the seed and the sizes), shared by later workers.
    key = hashlib.sha256(json.dumps([weights_sha(model), dataclasses.asdict(task()), seed, cfg["n_train"],
                                     cfg["n_pref"], k]).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / "preference_data" / f"s{seed}_{key}.json" if cache_dir else None
    if cache is not None and cache.exists():
        data = json.loads(cache.read_text())
    else:
        data = _draw_preference_data(cfg, model, seed, k)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_suffix(f".{os.getpid()}.tmp")
            partial.write_text(json.dumps(data))
            partial.replace(cache)  # atomic: a worker drawing the same data at the same time writes the same file
    return {**data, **{name: Dataset.from_list(data[name]) for name in ("pairs", "lists", "positives")}}


def _draw_preference_data(cfg, model, seed: int, k: int) -> dict:
    import torch

    from trl_distill import hmm_task

    lang = hmm_task.language(task())
    prompts, completions = train_pairs(cfg, seed)
    prompts, completions = prompts[: cfg["n_pref"]], completions[: cfg["n_pref"]]
    generator = torch.Generator().manual_seed(30_000 + seed)
    samples = [hmm_task.sample_completions(model, task(), prompts, generator).tolist() for _ in range(k)]
    valid = [lang.is_valid(prompts, s) for s in samples]
    pairs, lists, positives, from_data = [], [], [], 0
    for i, prompt in enumerate(prompts.tolist()):
        texts = [hmm_task.decode_words(samples[j][i], task().n_words) for j in range(k)]
        rewards = [float(valid[j][i]) for j in range(k)]
        if min(rewards) == 1.0 or not all(texts):  # no preference to learn; or an empty sample (ends at once),
            continue  # which TRL's trainers cannot train on
        if max(rewards) == 0.0:
            texts[0], rewards[0] = hmm_task.words_text(completions[i].tolist()), 1.0
            from_data += 1
        message = hmm_task.prompt_messages(prompt)
        chosen, rejected = texts[rewards.index(1.0)], texts[rewards.index(0.0)]
        pairs.append({"prompt": message, "chosen": hmm_task.completion_messages(chosen),
                      "rejected": hmm_task.completion_messages(rejected)})
        lists.append({"prompt": message, "completions": [hmm_task.completion_messages(t) for t in texts],
                      "rewards": rewards})
        positives.append({"prompt": message, "completion": hmm_task.completion_messages(chosen)})
    return {"pairs": pairs, "lists": lists, "positives": positives,
            "start_sample_validity": sum(map(sum, valid)) / (len(prompts) * k), "n_pairs": len(pairs),
            "chosen_from_data": from_data / max(1, len(pairs))}


def aligned_teacher(output_dir: str, cfg, teacher, tokenizer):
    """The teacher plus a LoRA adapter trained with TRL's DPO to prefer samples of p* (chosen) over its own invalid
    samples at temperature 1.5 (rejected), cached under the output dir; adapter on = the aligned teacher, adapter
    off = its reference (ADPA, SPEC section 5)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from trl import DPOConfig, DPOTrainer

    from trl_distill import hmm_task

    path = Path(output_dir) / "aligned_teacher_adapter"
    if (path / "adapter_config.json").exists():
        return PeftModel.from_pretrained(copy.deepcopy(teacher), path).eval()
    prompts, completions = hmm_task.sample_pairs(task(), cfg["n_pref"], "preference")
    samples = hmm_task.sample_completions(teacher, task(), prompts, torch.Generator().manual_seed(40_000),
                                          temperature=1.5).tolist()
    valid = hmm_task.language(task()).is_valid(prompts, samples)
    rows = [{"prompt": hmm_task.prompt_messages(prompt),
             "chosen": hmm_task.completion_messages(hmm_task.words_text(completion)),
             "rejected": hmm_task.completion_messages(hmm_task.decode_words(sample, task().n_words))}
            for prompt, completion, sample, ok in zip(prompts.tolist(), completions.tolist(), samples, valid) if not ok]
    args = trainer_args(str(path) + "_run", cfg["teacher_dpo_steps"], 16, 5e-4, 0, lr_scheduler_type="cosine",
                        max_length=64, beta=0.1)
    trainer = DPOTrainer(model=copy.deepcopy(teacher), args=DPOConfig(**args), train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    trainer.train()
    trainer.model.save_pretrained(path)
    return trainer.model.eval()


# ---------------------------------------------------------------------------------------------------------------
# One run (a worker)
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(method, cli, cfg, seed, lr, tokenizer, teacher, counts):
    """The trainer of ``method`` (counting its tokens) and a dict of extra facts about its data."""
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    from trl_distill import hmm_task
    from trl_distill.trainers.adpo import ADPOConfig, ADPOTrainer
    from trl_distill.trainers.distill_dpo import DistillDPOConfig, DistillDPOTrainer
    from trl_distill.trainers.gkd import GKDVariant, GKDVariantConfig
    from trl_distill.trainers.okd import OKDConfig, OKDTrainer
    from trl_distill.trainers.redi import REDIConfig, REDITrainer

    steps, out = cfg["steps"], str(run_dir(cli.output_dir, method, seed, lr))
    args = trainer_args(out, steps, cfg["batch_size"], lr, seed, lr_scheduler_type="cosine",
                        warmup_steps=max(1, int(0.05 * steps)), weight_decay=0.01, max_grad_norm=1.0,
                        logging_steps=max(1, steps // 30))
    on_policy = dict(temperature=1.0, max_new_tokens=task().completion_length + 1)
    prompts, completions = train_pairs(cfg, seed)

    if method in DISTILL_METHODS:
        student = fresh_student(cfg, tokenizer, seed) if cli.student_start == "fresh" else sft_start(cli, seed)
        if method in ("sft", "seqkd"):
            texts = teacher_samples(cfg, teacher, prompts, seed) if method == "seqkd" else completions
            data = hmm_task.sft_dataset(prompts, texts, format="prompt_completion")
            return counting(SFTTrainer, counts)(model=student, args=SFTConfig(**args), train_dataset=data,
                                                processing_class=tokenizer), student, {}
        if method.startswith("okd_"):
            data = hmm_task.sft_dataset(prompts, completions, format="prompt_completion")
            config = OKDConfig(**args, alpha=float(method.removeprefix("okd_a")), loss_type="forward_kl")
            return counting(OKDTrainer, counts)(model=student, teacher_model=teacher, args=config,
                                                train_dataset=data, processing_class=tokenizer), student, {}
        if method == "trl_distillation":
            data = hmm_task.sft_dataset(prompts, completions, format="prompt")
            config = DistillationConfig(**args, beta=0.5, temperature=1.0,
                                        max_completion_length=task().completion_length + 1)
            return counting(DistillationTrainer, counts)(model=student, teacher_model=teacher, args=config,
                                                         train_dataset=data, processing_class=tokenizer), student, {}
        data = hmm_task.sft_dataset(prompts, completions, format="messages")
        if method == "trl_gkd":
            config = GKDConfig(**args, lmbda=0.5, beta=0.5, **on_policy)
            return counting(GKDTrainer, counts)(model=student, teacher_model=teacher, args=config,
                                                train_dataset=data, processing_class=tokenizer), student, {}
        loss, lmbda = method.removeprefix("gkd_").rsplit("_l", 1)
        config = GKDVariantConfig(**args, loss_type=loss, lmbda=float(lmbda), beta=0.5, **on_policy)
        return counting(GKDVariant, counts)(model=student, teacher_model=teacher, args=config, train_dataset=data,
                                            processing_class=tokenizer), student, {}

    policy = sft_start(cli, seed)
    data = preference_data(cfg, policy, seed, cache_dir=cli.output_dir)
    facts = {key: data[key] for key in ("start_sample_validity", "n_pairs", "chosen_from_data")}
    facts["start_lr"] = start_lr_of(cli)
    args = {**args, "max_length": 64}
    if method == "sft_pos":
        return counting(SFTTrainer, counts)(model=policy, args=SFTConfig(**args), train_dataset=data["positives"],
                                            processing_class=tokenizer), policy, facts
    if method == "dpo":
        return counting(DPOTrainer, counts)(model=policy, ref_model=copy.deepcopy(policy),
                                            args=DPOConfig(**args, beta=0.1), train_dataset=data["pairs"],
                                            processing_class=tokenizer), policy, facts
    if method.startswith("ddpo_"):
        mode, _, top_k = method.removeprefix("ddpo_").partition("_k")  # ddpo_adpa_k5: teacher_top_k=5
        reference = aligned_teacher(cli.output_dir, cfg, teacher, tokenizer) if mode == "adpa" else teacher
        config = DistillDPOConfig(**args, beta=0.1, mode=mode, adpa_max_new_tokens=task().completion_length + 1,
                                  **({"teacher_top_k": int(top_k)} if top_k else {}))
        return counting(DistillDPOTrainer, counts)(model=policy, teacher_model=reference, args=config,
                                                   train_dataset=data["pairs"], processing_class=tokenizer), policy, facts
    if method.startswith("adpo_"):
        config = ADPOConfig(**args, anchor=method.removeprefix("adpo_"))
        return counting(ADPOTrainer, counts)(model=policy, ref_model=copy.deepcopy(policy), args=config,
                                             train_dataset=data["lists"], processing_class=tokenizer), policy, facts
    if method == "redi":
        return counting(REDITrainer, counts)(model=policy, args=REDIConfig(**args, alpha=0.8),
                                             train_dataset=data["pairs"], processing_class=tokenizer), policy, facts
    raise ValueError(f"unknown method {method!r}")


def start_lr_of(cli) -> float:
    """The learning rate of the sft run the continued methods start from."""
    return cli.sft_start_lr if cli.sft_start_lr is not None else SIZES[cli.size]["sft_start_lr"]


def continues_from_sft(cli, method: str) -> bool:
    return method != "sft" and (method in PREFERENCE_METHODS or cli.student_start == "sft")


def learning_rates_of(cli, cfg, method: str) -> tuple[float, ...]:
    return cfg["continued_learning_rates"] if continues_from_sft(cli, method) else cfg["learning_rates"]


def sft_start_path(cli, seed: int) -> Path:
    return run_dir(cli.sft_dir or cli.output_dir, "sft", seed, start_lr_of(cli)) / "final"


def sft_start_ready(cli, method: str, seed: int) -> bool:
    """Whether a run of ``method`` can start: it starts from a fresh student, or its seed's sft start is saved."""
    return not continues_from_sft(cli, method) or (sft_start_path(cli, seed) / "config.json").exists()


def sft_start(cli, seed: int):
    """The seed's SFT student (the sft run at `start_lr_of(cli)`), loaded fresh: a start for continued training."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(sft_start_path(cli, seed))


def run_one(cli, method: str, seed: int, lr: float) -> dict:
    """Train one (method, seed, learning rate), measure it and save its student in ``<run dir>/final`` (the sft
    run's is the continued methods' start; every run's can be measured again, e.g. by exposure_bias.py)."""
    import datasets
    import torch
    from transformers import PrinterCallback, TrainerCallback

    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    cfg = config_of(cli)
    memory = PeakMemory("cpu")
    memory.start()
    teacher, tokenizer = load_teacher(cfg) if method in TEACHER_METHODS else (None, None)
    teacher_sha = weights_sha(teacher)[:12] if teacher is not None else None  # before OKD adds its LoRA module
    if tokenizer is None:
        from trl_distill import hmm_task

        tokenizer = hmm_task.make_tokenizer(task().n_words)
    counts: list[tuple[int, int]] = []
    trainer, student, facts = build_trainer(method, cli, cfg, seed, lr, tokenizer, teacher, counts)

    class Curve(TrainerCallback):
        """KL and validity on the curve subsets every ``eval_every`` steps, left out of time and memory."""

        def __init__(self):
            self.points = [{"step": 0, **measure(student, cfg, seed, full=False)}]
            self.seconds = 0.0

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % cfg["eval_every"] == 0 and state.global_step < state.max_steps:
                memory.pause()
                began = time.perf_counter()
                self.points.append({"step": state.global_step, **measure(student, cfg, seed, full=False)})
                self.seconds += time.perf_counter() - began
                memory.resume()

    curve = Curve()
    trainer.add_callback(curve)
    trainer.remove_callback(PrinterCallback)
    memory.resume()
    began = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - began - curve.seconds
    peak = memory.stop()
    final = measure(student, cfg, seed)
    curve.points.append({"step": trainer.state.global_step, **measure(student, cfg, seed, full=False)})
    student.save_pretrained(run_dir(cli.output_dir, method, seed, lr) / "final")  # sft's: the continued runs' start
    tokens = sum(n for _, n in counts)
    log = trainer.state.log_history
    return {
        "method": method, "seed": seed, "learning_rate": lr, "size": cli.size, "student_start": cli.student_start,
        **final, **facts, "cpu": cpu_name(), "teacher_sha": teacher_sha,
        "curve": curve.points,
        "loss": [(e["step"], e["loss"]) for e in log if "loss" in e],
        "rewards_margin": [(e["step"], e["rewards/margins"]) for e in log if "rewards/margins" in e],
        "train_seconds": train_seconds, "tokens": tokens, "tokens_per_s": tokens / max(train_seconds, 1e-9),
        "peak_mib": mib(peak), "steps": trainer.state.global_step,
    }


# ---------------------------------------------------------------------------------------------------------------
# The sweep (parent)
# ---------------------------------------------------------------------------------------------------------------


def done_runs(path: Path) -> dict:
    runs = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            runs[(row["method"], row["seed"], row["learning_rate"])] = row
    return runs


def prepare(cli, cfg) -> dict:
    """The teacher (trained and cached on first use) and its scores, so workers start from a warm cache."""
    import torch

    torch.set_num_threads(2)
    teacher, tokenizer = load_teacher(cfg)
    info = {f"teacher_{k}": v for k, v in measure(teacher, cfg, 0).items()}
    info.update(teacher_sha=weights_sha(teacher)[:12], cpu=cpu_name())
    print(f"teacher {cfg['teacher']}: forward KL to p* {info['teacher_forward_kl']:.4f}/token, validity "
          f"{info['teacher_validity']:.3f} (greedy {info['teacher_validity_greedy']:.3f})", flush=True)
    if any(m.startswith("ddpo_adpa") for m in cli.methods):
        aligned_teacher(cli.output_dir, cfg, teacher, tokenizer)
    return info


def sweep(cli) -> None:
    cfg = config_of(cli)
    out = Path(cli.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(method in TEACHER_METHODS for method in cli.methods):  # SFT-only sweeps need no teacher
        (out / "info.json").write_text(json.dumps(prepare(cli, cfg), indent=1))
    runs_path = out / "runs.jsonl"
    done = done_runs(runs_path)
    # Method by method, so that a sweep stopped early leaves whole rows (every seed) rather than partial ones; SFT
    # first, as the continued methods start from its student.
    todo = [(m, s, lr) for m in cli.methods for lr in learning_rates_of(cli, cfg, m) for s in cfg["seeds"]
            if (m, s, lr) not in done]
    todo.sort(key=lambda run: run[0] != "sft")
    made_here = cli.sft_dir in (None, cli.output_dir)  # this sweep's sft runs are the continued methods' starts
    for method, seed, _ in todo:
        if not sft_start_ready(cli, method, seed) and not (made_here and ("sft", seed, start_lr_of(cli)) in todo):
            raise RuntimeError(f"{method} needs the sft run of seed {seed}, lr {start_lr_of(cli):g} in "
                               f"{cli.sft_dir or cli.output_dir}: run 'sft' at that lr")
    began = time.time()

    def record(run, row, seconds):
        with runs_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[run] = row
        print(f"[{time.time() - began:6.0f} s] {run[0]} seed {run[1]} lr {run[2]:g}: KL {row['forward_kl']:.4f}, "
              f"validity {row['validity']:.3f} / greedy {row['validity_greedy']:.3f}, train "
              f"{row['train_seconds']:.0f} s ({seconds:.0f} s in all)", flush=True)

    if cli.in_process:
        for run in todo:
            start = time.time()
            record(run, run_one(cli, *run), time.time() - start)
        return
    failed = run_in_workers(cli, todo, runs_path, record)
    if failed:
        raise RuntimeError("runs failed (their output is in each run's worker.log):\n" + "\n".join(failed))


# Imported once by the fork server that every worker is forked from, instead of once per worker (~10 s each).
WORKER_PRELOAD = ("torch", "transformers", "datasets", "peft", "trl", "trl.trainer.sft_trainer",
                  "trl.trainer.dpo_trainer", "trl.trainer.distillation_trainer", "trl.experimental.gkd",
                  "trl_distill.hmm_task", "trl_distill.testing", "trl_distill.trainers.gkd", "trl_distill.trainers.okd",
                  "trl_distill.trainers.distill_dpo", "trl_distill.trainers.adpo", "trl_distill.trainers.redi")


def run_in_workers(cli, todo: list, runs_path: Path, record) -> list[str]:
    """Run ``todo`` ``cli.jobs`` at a time, each in a fresh process forked from a server that has imported the
    libraries once (a fresh process per run keeps one run's retained heap out of the next one's peak RSS). A
    continued run waits only for its own seed's sft run. Returns the runs that failed."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    pending, running, failed, started = list(todo), {}, [], {}
    saved_env = {key: os.environ.get(key) for key in WORKER_ENV}
    os.environ.update(WORKER_ENV)  # the fork server, started on the first submit, passes it to every worker

    def next_ready():  # the first pending run whose start exists (runs are removed from pending as they start)
        return next((run for run in pending if sft_start_ready(cli, run[0], run[1])), None)

    try:
        with ProcessPoolExecutor(cli.jobs, mp_context=context, max_tasks_per_child=1) as pool:
            while pending or running:
                while len(running) < cli.jobs and (run := next_ready()) is not None:
                    pending.remove(run)
                    if run in done_runs(runs_path):  # finished meanwhile by another sweep writing to the same folder
                        continue
                    log = run_dir(cli.output_dir, *run) / "worker.log"
                    running[pool.submit(run_logged, cli, run, str(log))] = run
                    started[run] = time.time()
                if not running:  # what is left waits for an sft run that failed
                    failed += [f"{m} seed {s} lr {lr:g}: its sft start failed" for m, s, lr in pending]
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    run = running.pop(future)
                    try:
                        record(run, future.result(), time.time() - started[run])
                    except Exception as error:  # noqa: BLE001 - reported with the others at the end
                        failed.append(f"{run[0]} seed {run[1]} lr {run[2]:g}: {type(error).__name__}: {error}")
                        print(f"FAILED {failed[-1]}", flush=True)
    finally:
        for key, value in saved_env.items():
            if value is None:
                del os.environ[key]
            else:
                os.environ[key] = value
    return failed


def run_logged(cli, run: tuple, log: str) -> dict:
    """`run_one` in a worker, its stdout and stderr (progress bars, warnings, a traceback) in the file ``log``."""
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as file:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(file.fileno(), 1)
        os.dup2(file.fileno(), 2)
        try:
            return run_one(cli, *run)
        except BaseException:
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            raise


# ---------------------------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------------------------

METRICS = ("forward_kl", "validity", "validity_greedy", "train_seconds", "tokens_per_s", "peak_mib")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def aggregate(runs: dict, methods) -> list[dict]:
    """One row per (method, learning rate): mean and std over seeds of every metric, and the seeds used."""
    rows = []
    for method in methods:
        for lr in sorted({k[2] for k in runs if k[0] == method}):
            group = [r for k, r in sorted(runs.items()) if k[0] == method and k[2] == lr]
            row = {"method": method, "learning_rate": lr, "seeds": [r["seed"] for r in group]}
            for metric in METRICS + ("start_sample_validity",):
                row[metric] = mean_std([r.get(metric) for r in group])
            rows.append(row)
    return rows


def best_per_method(rows: list[dict]) -> list[dict]:
    """Per method, the grid point with the lowest mean forward KL (ties: the first)."""
    best = {}
    for row in rows:
        if row["method"] not in best or row["forward_kl"][0] < best[row["method"]]["forward_kl"][0]:
            best[row["method"]] = row
    return list(best.values())


def fmt(pair, spec=".4f", percent=False):
    mean, std = pair
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f} ± {100 * std:.1f}%" if percent else f"{mean:{spec}} ± {std:{spec}}"


def markdown(rows: list[dict], with_lr: bool = True) -> str:
    head = ("| method | lr | seeds | forward KL(p*‖student)/token | validity (T=1) | validity (greedy) | train s | "
            "tokens/s | peak MiB |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['method']} | {r['learning_rate']:g} | {len(r['seeds'])} | {fmt(r['forward_kl'])} | "
                     f"{fmt(r['validity'], percent=True)} | {fmt(r['validity_greedy'], percent=True)} | "
                     f"{fmt(r['train_seconds'], '.0f')} | {fmt(r['tokens_per_s'], ',.0f')} | "
                     f"{fmt(r['peak_mib'], '.0f')} |")
    return "\n".join(lines)


def curve_styles(methods: list[str], continued: set[str]) -> dict[str, dict]:
    """Matplotlib line keywords per method, so that 20-odd curves stay readable: one colour per family (a divergence,
    OKD, ADPA, each other trainer), the line style for the setting within it (lmbda 0 / 0.5 / 1, OKD's alpha 0.1 /
    0.3 / 0.5, ADPA's top-k 50 / 5), and an x marker for a method continued from the SFT student."""
    import matplotlib

    def family(method: str) -> tuple[str, int]:
        if method in GKD_METHODS:
            loss, _, lmbda = method.removeprefix("gkd_").rpartition("_l")
            return loss, [f"{x:g}" for x in LMBDAS].index(lmbda)
        if method in OKD_METHODS:
            return "okd", OKD_METHODS.index(method)
        if method.startswith("ddpo_adpa"):
            return "ddpo_adpa", int(method != "ddpo_adpa")
        return method, 0

    families = list(dict.fromkeys(family(m)[0] for m in methods))
    if len(families) <= 10:
        palette = matplotlib.colormaps["tab10"].colors
    else:  # tab20's dark shades first, then the light ones: neighbouring families never share a hue
        palette = matplotlib.colormaps["tab20"].colors[0::2] + matplotlib.colormaps["tab20"].colors[1::2]
    styles = {}
    for method in methods:
        name, setting = family(method)
        styles[method] = dict(color=palette[families.index(name) % len(palette)], linestyle=("-", "--", ":")[setting],
                              marker="x" if method in continued else ".")
    return styles


def plot(runs: dict, best: list[dict], info: dict, plot_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(plot_dir).mkdir(parents=True, exist_ok=True)
    paths = []
    order = [r for r in best]
    continued = {k[0] for k, run in runs.items() if k[0] in PREFERENCE_METHODS or run.get("student_start") == "sft"}
    fig, axes = plt.subplots(1, 3, figsize=(16, max(4, 0.32 * len(order) + 1.5)))
    names = [f"{r['method']} (lr {r['learning_rate']:g}, {len(r['seeds'])} seeds)" for r in order]
    for ax, metric, label in zip(axes, ("forward_kl", "validity", "validity_greedy"),
                                 ("forward KL(p*‖student) per token (lower is better)", "validity, T=1 (higher is "
                                  "better)", "validity, greedy")):
        means = [r[metric][0] for r in order]
        stds = [r[metric][1] for r in order]
        colors = ["tab:red" if r["method"] in continued else "tab:blue" for r in order]
        ax.barh(range(len(order)), means, xerr=stds, color=colors, alpha=0.8, capsize=2)
        ax.set_yticks(range(len(order)), names if metric == "forward_kl" else [""] * len(order), fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(label, fontsize=8)
        if metric == "forward_kl":
            ax.set_xscale("log")  # the methods differ by factors, from the teacher's 0.003 to a stalled 0.4
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # within a decade they overlap
        if metric == "forward_kl" and "teacher_forward_kl" in info:
            ax.axvline(info["teacher_forward_kl"], color="gray", linestyle="--", label="teacher")
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("quality.py: mean ± std over seeds (blue: from a fresh student, red: from the SFT student)")
    fig.tight_layout()
    path = str(Path(plot_dir) / "quality_bars.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(15, 5))
    styles = curve_styles([r["method"] for r in order], continued)
    for r in order:
        group = [run for k, run in runs.items() if k[0] == r["method"] and k[2] == r["learning_rate"]]
        steps = [p["step"] for p in group[0]["curve"]]
        for ax, metric in zip(axes, ("forward_kl", "validity")):
            values = [sum(run["curve"][i][metric] for run in group) / len(group) for i in range(len(steps))]
            ax.plot(steps, values, label=r["method"], **styles[r["method"]])
    axes[0].set(xlabel="optimizer step", ylabel="forward KL per token (300 held-out samples)", yscale="log")
    axes[1].set(xlabel="optimizer step", ylabel="validity, T=1 (200 held-out prompts)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, ncol=1 + len(order) // 24, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = str(Path(plot_dir) / "quality_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
    return paths


# The predictions of docs/benchmarks.md, each a set of paired comparisons on the same seeds: (better, worse, metric)
# with the direction the papers predict ("lower" forward KL, "higher" validity). A comparison *holds* when the mean
# paired difference favours the prediction by more than two standard errors, *fails* when it goes the other way by as
# much, and is *unresolved* otherwise.
PREDICTIONS = [
    ("1. every KD method beats SFT on forward KL",
     [(m, "sft", "forward_kl") for m in (*GKD_METHODS, "trl_gkd", "trl_distillation", *OKD_METHODS, "seqkd")]),
    ("2. on-policy beats off-policy on validity",
     [(f"gkd_{loss}_l1", f"gkd_{loss}_l0", "validity") for loss in LOSS_TYPES]),
    ("3a. reverse KL / skew reverse KL: higher validity than forward KL / skew KL",
     [(f"gkd_reverse_kl_l{x}", f"gkd_forward_kl_l{x}", "validity") for x in ("0", "0.5", "1")]
     + [(f"gkd_skew_rkl_l{x}", f"gkd_skew_kl_l{x}", "validity") for x in ("0", "0.5", "1")]),
    ("3b. ... and higher forward KL (mode seeking)",
     [(f"gkd_forward_kl_l{x}", f"gkd_reverse_kl_l{x}", "forward_kl") for x in ("0", "0.5", "1")]
     + [(f"gkd_skew_kl_l{x}", f"gkd_skew_rkl_l{x}", "forward_kl") for x in ("0", "0.5", "1")]),
    ("4a. OKD at least as good as frozen-teacher KD (forward KL)",
     [(m, "gkd_forward_kl_l0", "forward_kl") for m in OKD_METHODS]),
    ("5. every preference method raises validity over its SFT start",
     [(m, "sft", "validity") for m in PREFERENCE_METHODS]),
    ("6. REDI beats SFT on the positives alone", [("redi", "sft_pos", "validity")]),
    ("7a. ADPO at least as good as DPO", [(m, "dpo", "validity") for m in ("adpo_fixed", "adpo_ema")]),
    ("7b. DCKD / ADPA beat plain DPO",
     [(m, "dpo", metric) for m in ("ddpo_dckd", "ddpo_adpa") for metric in ("validity", "forward_kl")]),
    ("8. sequence-level KD beats SFT on validity", [("seqkd", "sft", "validity")]),
    ("9. our JSD (lmbda 0.5) and TRL's GKDTrainer agree (no difference expected)",
     [("gkd_jsd_l0.5", "trl_gkd", "forward_kl"), ("gkd_jsd_l0.5", "trl_gkd", "validity")]),
    ("10. ADPA with its top-k scaled to the vocabulary (5 of 69) beats DPO on validity and keeps greedy validity",
     [("ddpo_adpa_k5", "dpo", "validity"), ("ddpo_adpa_k5", "ddpo_adpa", "validity_greedy")]),
]
# Prediction 4b (OKD cheaper per step than on-policy GKD) is not checked here: these runs' seconds depend on what else
# shared the CPU when each ran (sweeps of different sessions), so it is measured side by side in one process by
# benchmarks/okd_speed.py at this task's completion length and batch (docs/benchmarks.md).
LOWER_IS_BETTER = {"forward_kl"}


def paired(runs: dict, better: str, worse: str, metric: str, lr: float) -> dict | None:
    """Mean and standard error of ``metric(better) - metric(worse)`` over the seeds both ran, and the verdict.

    A preference method compared with ``sft`` is compared with its own start: the sft run at its ``start_lr``.
    """
    mine = {k[1]: r for k, r in runs.items() if k[0] == better and k[2] == lr}
    starts = {r.get("start_lr", lr) for r in mine.values()}
    worse_lr = starts.pop() if worse == "sft" and better in PREFERENCE_METHODS and len(starts) == 1 else lr
    theirs = {k[1]: r for k, r in runs.items() if k[0] == worse and k[2] == worse_lr}
    seeds = sorted(set(mine) & set(theirs))
    if len(seeds) < 2:
        return None
    diffs = [mine[s][metric] - theirs[s][metric] for s in seeds]
    mean, std = mean_std(diffs)
    se = std / math.sqrt(len(diffs))
    sign = -1 if metric in LOWER_IS_BETTER else 1  # > 0: the difference favours `better`
    favour = sign * mean
    verdict = "holds" if favour > 2 * se else "fails" if favour < -2 * se else "unresolved"
    wins = sum(sign * d > 0 for d in diffs)
    return {"better": better, "worse": worse, "metric": metric, "lr": lr, "seeds": seeds, "mean_difference": mean,
            "standard_error": se, "wins": wins, "verdict": verdict}


def prediction_report(runs: dict) -> tuple[str, list]:
    lines, checked = [], []
    for lr in sorted({k[2] for k in runs}):
        rows = []
        for title, comparisons in PREDICTIONS:
            for better, worse, metric in comparisons:
                result = paired(runs, better, worse, metric, lr)
                if result is None:
                    continue
                checked.append({"prediction": title, **result})
                rows.append(f"| {title} | {better} vs {worse} | {metric} | {result['mean_difference']:+.4f} ± "
                            f"{result['standard_error']:.4f} | {result['wins']}/{len(result['seeds'])} | "
                            f"{result['verdict']} |")
        if rows:
            lines += [f"### Predictions checked at lr {lr:g} (paired over seeds; verdict at 2 standard errors)", "",
                      "| prediction | comparison | metric | mean difference ± s.e. | wins | verdict |",
                      "|---|---|---|---|---|---|", *rows, ""]
    return "\n".join(lines), checked


def merge(cli) -> dict:
    out = Path(cli.output_dir)
    runs = done_runs(out / "runs.jsonl")
    info = json.loads((out / "info.json").read_text()) if (out / "info.json").exists() else {}
    methods = [m for m in ALL_METHODS if any(k[0] == m for k in runs)]
    rows = aggregate(runs, methods)
    best = best_per_method(rows)
    results = {"config": {**config_of(cli), "task": dataclasses.asdict(task())}, "info": info, "grid": rows,
               "best": best}
    report, checked = prediction_report(runs)
    results["predictions"] = checked
    (out / "quality.json").write_text(json.dumps(results, indent=1))
    text = ["## Per method, the grid learning rate with the lowest mean KL", markdown(best), "",
            "## Every grid point", markdown(rows), "", report]
    if info:
        text.append(f"Teacher: forward KL {info['teacher_forward_kl']:.4f}/token, validity "
                    f"{info['teacher_validity']:.1%} (greedy {info['teacher_validity_greedy']:.1%}).")
    (out / "quality.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    plot_dir = cli.plot_dir if cli.plot_dir is not None else ("docs" if cli.size == "small" else str(out))
    if plot_dir and runs:
        for path in plot(runs, best, info, plot_dir):
            print(f"wrote {path}")
    print(f"wrote {out / 'quality.json'} and {out / 'quality.md'}")
    return results


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    cli = parse_args(argv)
    if not cli.merge:
        sweep(cli)
    return merge(cli)


if __name__ == "__main__":
    main()
