"""Where does ADPA's advantage point? A diagnostic of the aligned teacher `quality.py` builds for `ddpo_adpa`.

    python benchmarks/adpa_advantage.py [--output-dir outputs/quality_small] [--top-k 50 5] [--n 200]

ADPA's term is `-mean_t sum_{a in top-k} q(a|s_t) A(s_t, a)` with `A = log pi_aligned - log pi_ref` over the aligned
teacher's top-k actions (SPEC section 5): linear in the student's probabilities `q`, so it moves the student's mass
towards the action of largest advantage at each state, whatever that action's probability. This script measures, at
every completion position of `--n` held-out samples of p* (the task of `trl_distill.hmm_task`), for each `--top-k`:

* how often the action of largest advantage is impossible under p* (p*(a | prefix) = 0), and its median reference
  probability;
* the share of the top-k that is impossible under p*;
* the same with the advantage clamped to (0, 1) (`advantage_clamp`, the authors' code), where the largest value is
  shared by every action the adapter raised by at least a factor e (ties: the fraction of such actions that are
  impossible).

The aligned teacher is the cached adapter of `quality.py` (`<output-dir>/aligned_teacher_adapter`), built there when
missing. Reads nothing but that adapter and the cached teacher; deterministic.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/quality_small")
    parser.add_argument("--top-k", type=int, nargs="+", default=[50, 5])
    parser.add_argument("--n", type=int, default=200, help="held-out samples of p* (32 words + end each)")
    parser.add_argument("--size", default="small", choices=list(quality.SIZES))
    cli = parser.parse_args(argv)

    from trl_distill import hmm_task
    from trl_distill.models import adapter_disabled

    cfg = quality.SIZES[cli.size]
    teacher, tokenizer = quality.load_teacher(cfg)
    aligned = quality.aligned_teacher(cli.output_dir, cfg, teacher, tokenizer)
    prompts, completions = hmm_task.sample_pairs(quality.task(), cli.n, "eval", seed=2)
    log_aligned = hmm_task.completion_log_probs(aligned, prompts, completions, 100)
    with adapter_disabled(aligned):
        log_ref = hmm_task.completion_log_probs(aligned, prompts, completions, 100)
    p_star = hmm_task.language(quality.task()).completion_next_token_probs(prompts, completions)
    vocab = p_star.shape[-1]
    log_aligned, log_ref = log_aligned[..., :vocab].reshape(-1, vocab), log_ref[..., :vocab].reshape(-1, vocab)
    possible = (p_star > 0).reshape(-1, vocab)

    results = {"positions": int(log_aligned.shape[0]), "vocabulary": vocab}
    for k in cli.top_k:
        ids = log_aligned.topk(k, dim=-1).indices
        advantage = log_aligned.gather(1, ids) - log_ref.gather(1, ids)
        best = ids.gather(1, advantage.argmax(1, keepdim=True)).squeeze(1)
        best_possible = possible.gather(1, best.unsqueeze(1)).squeeze(1)
        top_k_possible = possible.gather(1, ids)
        clamped = advantage.clamp(0, 1)
        at_max = clamped == clamped.max(1, keepdim=True).values
        row = {
            "argmax_advantage_impossible": 1 - best_possible.double().mean().item(),
            "argmax_advantage_reference_prob_median": log_ref.gather(1, best.unsqueeze(1)).exp().median().item(),
            "argmax_advantage_median": advantage.max(1).values.median().item(),
            "top_k_impossible": 1 - top_k_possible.double().mean().item(),
            "clamped_max_impossible": 1 - (top_k_possible & at_max).sum().item() / at_max.sum().item(),
            "reference_argmax_impossible": 1 - possible.gather(1, log_ref.argmax(1, keepdim=True)).double().mean()
            .item(),
        }
        results[f"top_{k}"] = row
        print(f"top-k {k:3d}: the action of largest advantage is impossible under p* at "
              f"{row['argmax_advantage_impossible']:.1%} of positions (its reference probability: median "
              f"{row['argmax_advantage_reference_prob_median']:.2e}; largest advantage: median "
              f"{row['argmax_advantage_median']:.2f} nats); {row['top_k_impossible']:.1%} of the top-k is impossible; "
              f"clamped to (0, 1): {row['clamped_max_impossible']:.1%} of the actions at the maximum are impossible; "
              f"the reference's own argmax: {row['reference_argmax_impossible']:.1%}")
    path = Path(cli.output_dir) / "adpa_advantage.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"wrote {path}")
    return results


if __name__ == "__main__":
    main()
