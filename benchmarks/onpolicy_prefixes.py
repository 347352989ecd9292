"""How much of on-policy training sits after the student's first mistake? A diagnostic for `quality.py`'s GKD runs.

    python benchmarks/onpolicy_prefixes.py [--output-dir outputs/quality_small] [--seeds 0 1 2 3 4] [--n 500]

On-policy GKD (`lmbda=1`) trains on the student's own samples. On the task of `trl_distill.hmm_task` a sample that
has made one impossible move (a word p* gives probability 0 after its prefix, a special token, or a wrong length)
can never become valid again, and p*(. | prefix) no longer exists there: every later position teaches the student
what the teacher does on a prefix that validity never counts. This script samples, from each seed's SFT student
(the start of the runs continued from SFT) and from a fresh student (the start of the others), completions to `--n`
held-out prompts at temperature 1, as the on-policy trainer does, and reports the share of the loss positions (the
completion tokens up to and including the first end token, as GKD's labels mask them) that come after the first
impossible move. Off-policy training on samples of p* has none by construction.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402


def positions_after_first_error(config, prompts, tokens) -> tuple[int, int, int]:
    """(loss positions, positions after the first impossible move, samples with such a move) for token samples
    ``[n, L + 1]`` (`hmm_task.sample_completions`)."""
    import torch

    from trl_distill import hmm_task

    length, offset = config.completion_length, hmm_task.WORD_OFFSET
    is_word = (tokens[:, :length] >= offset) & (tokens[:, :length] < offset + config.n_words)
    words = torch.where(is_word, tokens[:, :length] - offset, torch.zeros_like(tokens[:, :length]))
    # p*(w_t | prefix) of each sampled word; exact up to the first non-word, where the check below stops anyway
    probs = hmm_task.language(config).next_word_probs(torch.cat([prompts, words], 1))[:, prompts.shape[1]:]
    possible = probs.gather(2, words.unsqueeze(2)).squeeze(2) > 0
    total = after = wrong = 0
    for i, row in enumerate(tokens.tolist()):
        end = row.index(hmm_task.END_ID) + 1 if hmm_task.END_ID in row else len(row)
        row = row[:end]  # the loss covers the completion up to and including its first end token
        first_error = None
        for t, token in enumerate(row):
            ok = token == hmm_task.END_ID if t == length else bool(is_word[i, t] and possible[i, t])
            if not ok:
                first_error = t
                break
        total += len(row)
        if first_error is not None:
            wrong += 1
            after += len(row) - first_error - 1
    return total, after, wrong


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/quality_small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sft-lr", type=float, default=3e-3, help="the sft runs' learning rate (their folder)")
    parser.add_argument("--size", default="small", choices=list(quality.SIZES))
    cli = parser.parse_args(argv)

    import torch
    from transformers import LlamaForCausalLM

    from trl_distill import hmm_task

    cfg, config = quality.SIZES[cli.size], quality.task()
    prompts, _ = hmm_task.sample_pairs(config, cli.n, "eval", seed=1)
    tokenizer = hmm_task.make_tokenizer(config.n_words)
    results = {}
    for start in ("sft", "fresh"):
        rows = []
        for seed in cli.seeds:
            if start == "sft":
                path = quality.run_dir(cli.output_dir, "sft", seed, cli.sft_lr) / "final"
                model = LlamaForCausalLM.from_pretrained(path)
            else:
                model = quality.fresh_student(cfg, tokenizer, seed)
            tokens = hmm_task.sample_completions(model, config, prompts, torch.Generator().manual_seed(50_000 + seed))
            total, after, wrong = positions_after_first_error(config, prompts, tokens)
            rows.append({"seed": seed, "loss_positions": total, "after_first_error": after / total,
                         "samples_with_error": wrong / len(prompts)})
        shares = [r["after_first_error"] for r in rows]
        results[start] = {"runs": rows, "after_first_error_mean": statistics.mean(shares),
                          "after_first_error_std": statistics.stdev(shares) if len(shares) > 1 else 0.0,
                          "samples_with_error_mean": statistics.mean(r["samples_with_error"] for r in rows)}
        print(f"{start} student ({len(rows)} seeds): {results[start]['after_first_error_mean']:.1%} ± "
              f"{results[start]['after_first_error_std']:.1%} of the on-policy loss positions come after the first "
              f"impossible move; {results[start]['samples_with_error_mean']:.1%} of the samples make one")
    path = Path(cli.output_dir) / "onpolicy_prefixes.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
