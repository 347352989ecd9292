"""REDITrainer: reinforcement distillation from positive and negative teacher traces
([REDI](https://huggingface.co/papers/2505.24850)).

REDI's stage 2 is reference-free: for a pair of teacher traces, one correct (`chosen`) and one incorrect
(`rejected`),

    L = - l(y_w) / |y_w| + alpha * l(y_l) / |y_l|,

with `l` the policy's sequence log-probability and `|y|` the number of completion tokens. The rejected term is
down-weighted (`alpha` < 1) so the policy does not collapse by pushing every likelihood down; `alpha = 0` is
length-normalized SFT on the positives. Stage 1 is plain SFT on the positive traces (TRL's `SFTTrainer`; see
`examples/redi.py`).

`DPOTrainer` -> `REDITrainer` (and `DPOConfig` -> `REDIConfig`) is the only change a TRL DPO script needs: data
(`prompt`/`chosen`/`rejected`), tokenization and collator are TRL's. No reference model is loaded, kept or run.

Authors' code: https://github.com/Tim-Siu/reinforcement-distillation.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import torch
from trl import DPOConfig, DPOTrainer

from ._common import DistillArguments, DistillTrainerMixin
from ._dpo import completion_token_logps
from ..teacher import disable_cpu_4bit_packing
from ..validation import PREFERENCE_FORMATS, validate_datasets

# DPO loss settings REDI's loss replaces, with their DPOConfig defaults: changing one is an error, not a no-op.
UNUSED_DPO_FIELDS = {
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0,
    "use_weighting": False,
    "sync_ref_model": False,
}


@dataclass
class REDIConfig(DistillArguments, DPOConfig):
    r"""
    Configuration for [`REDITrainer`] ([REDI](https://huggingface.co/papers/2505.24850)). Every field of TRL's
    `DPOConfig` keeps its meaning, except those of the reference model and of the DPO loss (`beta`, `loss_type`,
    `sync_ref_model`, ...), which a reference-free loss does not use: setting one is an error.
    `precompute_ref_log_probs` is always `True`, TRL's switch for keeping no reference model in memory (REDI has none;
    nothing is precomputed).

    The authors' stage-2 settings (the documented GPU recipe): AdamW, `learning_rate=1e-6`, `weight_decay=1e-4`,
    `warmup_steps=0.1` (10% of the steps) then linear decay, batch size 32, one epoch, `alpha=0.8`.

    `overwrite_output_dir` and `on_nonfinite` are shared by every trl-distill config (see [`DistillArguments`]).

    Args:
        alpha (`float`, *optional*, defaults to `0.8`):
            Weight of the normalized log-likelihood of the rejected (negative) trace. `0.8` is the authors' recipe
            (their code's default is `1.0`, which the paper reports as less stable); `0` is SFT on the positives.
    """

    alpha: float = field(
        default=0.8, metadata={"help": "Weight of the rejected trace's normalized log-likelihood (0 = SFT on chosen)."}
    )
    # TRL's public switch for "keep no reference model in memory" (see `DPOConfig`): REDI has no reference at all, so
    # it is always on, and `REDITrainer` precomputes nothing under it.
    precompute_ref_log_probs: bool = field(
        default=True,
        metadata={"help": "Always True for REDI: no reference model is loaded (nothing is precomputed either)."},
    )

    def __post_init__(self):
        # Our own field first: the parents' checks (e.g. bf16 on a CPU machine) must not hide a wrong one of ours.
        if self.alpha < 0:
            raise ValueError(f"REDIConfig.alpha must be >= 0, got {self.alpha}.")
        if not self.precompute_ref_log_probs:
            raise ValueError(
                "REDIConfig.precompute_ref_log_probs=False would make TRL load a reference model, which REDI does not "
                "have: leave it True (its default; REDI precomputes nothing)."
            )
        super().__post_init__()
        for name, default in UNUSED_DPO_FIELDS.items():
            if getattr(self, name) != default:
                raise ValueError(
                    f"REDIConfig.{name}={getattr(self, name)!r} is not used: REDI's loss is reference-free and "
                    "replaces DPO's."
                )


def redi_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """REDI's per-pair loss `-l(y_w)/|y_w| + alpha * l(y_l)/|y_l|` (lengths clamped to at least 1).

    Returns `(per_pair_loss, chosen_normalized_logps, rejected_normalized_logps)`.
    """
    chosen_normalized = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_normalized = rejected_logps / rejected_lengths.clamp(min=1)
    return -chosen_normalized + alpha * rejected_normalized, chosen_normalized, rejected_normalized


class REDITrainer(DistillTrainerMixin, DPOTrainer):
    """TRL's [`DPOTrainer`] with REDI's reference-free loss ([REDI](https://huggingface.co/papers/2505.24850)).

    Args are those of `DPOTrainer` except `ref_model`, which REDI does not have (passing one is an error). Works with
    full fine-tuning, LoRA/QLoRA (`peft_config`), gradient accumulation and TRL's `DataCollatorForPreference`.

    Logged metrics (train and eval): `logps/chosen_normalized`, `logps/rejected_normalized` (per-token mean
    log-probs), `logps/margin` (their difference), `logps/chosen`, `logps/rejected` (sums), `entropy`,
    `mean_token_accuracy` (chosen tokens), `num_tokens`.
    """

    _tag_names = ["trl", "trl-distill", "redi"]
    _name = "REDI"
    _paper = {
        "title": "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning",
        "id": "2505.24850",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{xu2025redi,
                title        = {{Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning}},
                author       = {Shuyao Xu and Cheng Peng and Jiangxuan Long and Weidi Xu and Wei Chu and Yuan Qi},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2505.24850},
            }"""),
    }

    def __init__(self, model, ref_model=None, args: REDIConfig | None = None, **kwargs):
        self._require_config(args, REDIConfig)
        if ref_model is not None:
            raise ValueError("REDI is reference-free: do not pass `ref_model`.")
        validate_datasets(
            "REDITrainer",
            kwargs.get("processing_class"),
            kwargs.get("train_dataset"),
            kwargs.get("eval_dataset"),
            formats=PREFERENCE_FORMATS,
        )
        # `precompute_ref_log_probs=True` (REDIConfig's fixed value) is how TRL is told to load no reference model;
        # `_precompute_ref_logps` below then adds nothing to the data.
        super().__init__(model, ref_model=None, args=args, **kwargs)
        # Nothing was precomputed and nothing is ever read: so TRL's `evaluate()` on a new dataset after training
        # neither precomputes nor refuses (its check for a reference that full fine-tuning no longer has).
        self.precompute_ref_logps = False
        disable_cpu_4bit_packing(self.model)  # a QLoRA policy on CPU would lose its gradients after no-grad passes
        if self.ref_model is not None:
            # Under FSDP, TRL loads the reference to precompute with it even on this branch: free it.
            self.ref_model = None

    def _precompute_ref_logps(self, dataset, name, batch_size):
        return dataset  # no reference, nothing to precompute (TRL calls this at init under precompute_ref_log_probs)

    def compute_ref_log_probs(self, model, inputs):
        raise RuntimeError("REDI is reference-free: no reference log-probs are computed.")

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        # One forward over [chosen; rejected] (TRL's collator order); the fused head returns per-token log-probs only.
        outputs, token_logps, shift_mask, model_kwargs, _ = completion_token_logps(model, inputs)
        seq_len = shift_mask.size(1)
        logps = token_logps.sum(dim=1)
        lengths = shift_mask.sum(dim=1)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        chosen_lengths, rejected_lengths = lengths.chunk(2, dim=0)
        per_pair, chosen_normalized, rejected_normalized = redi_loss(
            chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, self.args.alpha
        )
        loss = per_pair.mean()
        self._watch_terms({"chosen log-probs": chosen_logps, "rejected log-probs": rejected_logps})

        with torch.no_grad():
            gather_mean = lambda t: self.accelerator.gather_for_metrics(t.detach().float().reshape(-1)).mean().item()  # noqa: E731
            gather_sum = lambda t: self.accelerator.gather_for_metrics(t.detach().float().reshape(1)).sum()  # noqa: E731
            self._metrics[mode]["logps/chosen_normalized"].append(gather_mean(chosen_normalized))
            self._metrics[mode]["logps/rejected_normalized"].append(gather_mean(rejected_normalized))
            self._metrics[mode]["logps/margin"].append(gather_mean(chosen_normalized - rejected_normalized))
            self._metrics[mode]["logps/chosen"].append(gather_mean(chosen_logps))
            self._metrics[mode]["logps/rejected"].append(gather_mean(rejected_logps))
            tokens = gather_sum(shift_mask.sum()).clamp(min=1)
            self._metrics[mode]["entropy"].append(
                (gather_sum((outputs.entropy[:, -seq_len:] * shift_mask).sum()) / tokens).item()
            )
            chosen_mask = shift_mask.chunk(2, dim=0)[0].bool()
            chosen_top1 = outputs.is_top1[:, -seq_len:].chunk(2, dim=0)[0]
            self._metrics[mode]["mean_token_accuracy"].append(
                (gather_sum((chosen_top1 & chosen_mask).sum()) / gather_sum(chosen_mask.sum()).clamp(min=1)).item()
            )
            self._log_num_tokens(inputs, mode)

        if return_outputs:
            with torch.no_grad():  # as TRL: the fused head builds no logits, so rebuild them for `compute_metrics`
                outputs = model(**model_kwargs)
        loss = self._check_finite(loss, model, name="REDI loss")
        return (loss, outputs) if return_outputs else loss
