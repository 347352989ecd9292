"""DistillDPOTrainer: TRL's DPO with a teacher as the reference, plus the DCKD and ADPA distillation terms.

`DPOTrainer` -> `DistillDPOTrainer` (and `DPOConfig` -> `DistillDPOConfig`) and a `teacher_model` is the only change a
TRL DPO script needs. Three modes (SPEC section 5):

- `"teacher_ref"` ([LLaVA-MoD](https://huggingface.co/papers/2408.15881)): TRL's DPO loss, any `loss_type`, with the
  teacher as the reference model. With no extra term it *is* `DPOTrainer(ref_model=teacher)`: this class only loads the
  teacher (4-bit, LoRA adapter), checks the vocabularies and hands it to TRL as `ref_model`.
- `"dckd"` ([ADPA paper](https://huggingface.co/papers/2502.17927)): `sft_weight * CE(chosen) + chosen_kd_weight *
  KL(p_T || q)[chosen] + rejected_kd_weight * KL(p_T || q)[rejected]`, p_T the preference-aligned teacher.
- `"adpa"` (same paper): `sft_weight * CE(chosen) - adpa_weight * mean_t sum_a q(a|s_t) A(s_t, a)` with the teacher's
  advantage `A = log pi_aligned - log pi_ref` over the aligned teacher's top-k tokens. One LoRA teacher serves both:
  adapter on = aligned, adapter off = reference.

The DPO part always comes from TRL's `_compute_loss` (so its rewards/margins/accuracies are logged in every mode); the
distillation terms reuse the student's backbone output of that same forward (captured with a hook), so DCKD costs no
extra student forward.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from transformers import GenerationConfig
from trl import DPOConfig, DPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import pad

from .. import losses, offline_teacher
from ..models import eval_mode
from ._common import DistillArguments, DistillTrainerMixin
from ._teacher import TeacherArguments, TeacherTrainerMixin
from ..teacher import (
    adapter_disabled,
    backbone_hidden_states,
    causal_lm,
    check_plain_logits,
    check_vocab_compatible,
    disable_cpu_4bit_packing,
    output_head,
)
from ..validation import PREFERENCE_FORMATS, validate_datasets

MODES = ("teacher_ref", "dckd", "adpa")
ADPA_RESPONSES = ("student", "rejected")

# Weights left at `None` take their mode's default: the authors' recipes (SPEC section 5).
MODE_DEFAULT_WEIGHTS = {
    "teacher_ref": {"dpo_weight": 1.0, "sft_weight": 0.0, "chosen_kd_weight": 0.0, "rejected_kd_weight": 0.0,
                    "adpa_weight": 0.0},
    "dckd": {"dpo_weight": 0.0, "sft_weight": 1.0, "chosen_kd_weight": 0.1, "rejected_kd_weight": 0.1,
             "adpa_weight": 0.0},
    "adpa": {"dpo_weight": 0.0, "sft_weight": 1.0, "chosen_kd_weight": 0.0, "rejected_kd_weight": 0.0,
             "adpa_weight": 1.6},
}


@dataclass
class DistillDPOConfig(TeacherArguments, DistillArguments, DPOConfig):
    r"""
    Configuration for [`DistillDPOTrainer`]. Every field of TRL's `DPOConfig` keeps its meaning (`beta`, `loss_type`,
    `precompute_ref_log_probs`, ...); the fields below are added, with `overwrite_output_dir` and `on_nonfinite` shared
    by every trl-distill config (see [`DistillArguments`]). Weights left at `None` take the default of `mode`.

    Args:
        mode (`str`, *optional*, defaults to `"teacher_ref"`):
            `"teacher_ref"` (DPO with the teacher as reference, [LLaVA-MoD](https://huggingface.co/papers/2408.15881)),
            `"dckd"` (dual-constrained KD) or `"adpa"` (advantage-guided distillation), both from
            [Gao et al. 2025](https://huggingface.co/papers/2502.17927). The mode sets the default weights below; any
            term with a non-zero weight is computed in any mode (e.g. ADPA+ = `mode="adpa"` started from a DCKD
            student, or `mode="adpa"` with `chosen_kd_weight=0.1, rejected_kd_weight=0.1`).
        dpo_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight of TRL's DPO loss. Mode default: 1.0 for `"teacher_ref"`, 0.0 otherwise. At 0.0 the DPO loss is
            still computed for its logged rewards/margins/accuracies but not back-propagated.
        sft_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight `w_sft` of the cross-entropy on the chosen response (mean over its tokens). Mode default: 0.0 for
            `"teacher_ref"`, 1.0 for `"dckd"` and `"adpa"` (authors' recipe).
        chosen_kd_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight `w_chosen` of DCKD's forward KL(p_T || q) on the chosen response's tokens. Mode default: 0.1 for
            `"dckd"` (authors' recipe), 0.0 otherwise.
        rejected_kd_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight `w_rejected` of DCKD's forward KL(p_T || q) on the rejected response's tokens. Mode default: 0.1 for
            `"dckd"` (authors' recipe), 0.0 otherwise.
        adpa_weight (`float` or `None`, *optional*, defaults to `None`):
            Weight `w_adpa` of ADPA's advantage term `-mean_t sum_a q(a|s_t) A(s_t, a)`. Mode default: 1.6 for
            `"adpa"` (authors' recipe), 0.0 otherwise. Needs a teacher with a LoRA adapter.
        teacher_top_k (`int`, *optional*, defaults to `50`):
            The teacher's top-k tokens: DCKD's KL compares them plus a "rest" bucket holding the remaining mass (SPEC
            section 1); ADPA sums the advantage over the aligned teacher's top-k actions.
        adpa_responses (`str`, *optional*, defaults to `"student"`):
            Responses the advantage term is computed on: `"student"` (greedy generations of the student on the
            prompts, as the paper) or `"rejected"` (the dataset's rejected responses: no generation, cheaper).
        adpa_max_new_tokens (`int`, *optional*, defaults to `128`):
            Maximum length of the student's greedy responses when `adpa_responses="student"`.
        advantage_clamp (`list[float]` or `None`, *optional*, defaults to `None`):
            `[lo, hi]` clamps the advantage `A` to `[lo, hi]`. Not clamped by default. The authors' code ends up
            clamping `A` to (0, 1) through a probability-stabilising clamp; `[0.0, 1.0]` reproduces it.

    The teacher fields (`teacher_model_name_or_path`, `teacher_model_revision`, `teacher_model_init_kwargs`,
    `teacher_quantization`, `teacher_adapter`) are those of every config with a teacher (see [`TeacherArguments`]).
    Here `teacher_adapter` is the preference-aligned teacher's LoRA adapter: adapter on is the aligned teacher (the DPO
    reference and the KD target), adapter off is ADPA's reference teacher.
    """

    mode: str = field(default="teacher_ref", metadata={"help": f"Distillation mode, one of {MODES}."})
    dpo_weight: float | None = field(
        default=None, metadata={"help": "Weight of TRL's DPO loss (None: 1.0 in teacher_ref, 0.0 otherwise)."}
    )
    sft_weight: float | None = field(
        default=None, metadata={"help": "Weight of CE on chosen (None: 0.0 in teacher_ref, 1.0 otherwise)."}
    )
    chosen_kd_weight: float | None = field(
        default=None, metadata={"help": "Weight of KL(teacher || student) on chosen (None: 0.1 in dckd, else 0.0)."}
    )
    rejected_kd_weight: float | None = field(
        default=None, metadata={"help": "Weight of KL(teacher || student) on rejected (None: 0.1 in dckd, else 0.0)."}
    )
    adpa_weight: float | None = field(
        default=None, metadata={"help": "Weight of ADPA's advantage term (None: 1.6 in adpa, else 0.0)."}
    )
    teacher_top_k: int = field(
        default=50, metadata={"help": "Teacher top-k: KD compares these tokens plus a rest bucket; ADPA's actions."}
    )
    adpa_responses: str = field(
        default="student", metadata={"help": f"Responses of the ADPA term, one of {ADPA_RESPONSES}."}
    )
    adpa_max_new_tokens: int = field(
        default=128, metadata={"help": "Maximum new tokens of the student's greedy responses (adpa_responses=student)."}
    )
    advantage_clamp: list[float] | None = field(
        default=None, metadata={"help": "Clamp the advantage to [lo, hi]; [0, 1] reproduces the authors' code."}
    )

    def __post_init__(self):
        # Our own fields first: the parents' checks (e.g. bf16 on a CPU machine) must not hide a wrong one of ours.
        if self.mode not in MODES:
            raise ValueError(f"DistillDPOConfig.mode={self.mode!r} is not one of {MODES}.")
        for name, default in MODE_DEFAULT_WEIGHTS[self.mode].items():
            if getattr(self, name) is None:
                setattr(self, name, default)
            if getattr(self, name) < 0:
                raise ValueError(f"DistillDPOConfig.{name} must be >= 0, got {getattr(self, name)}.")
        if not any(getattr(self, name) for name in MODE_DEFAULT_WEIGHTS[self.mode]):
            raise ValueError(
                "DistillDPOConfig: every loss weight (dpo_weight, sft_weight, chosen_kd_weight, rejected_kd_weight, "
                "adpa_weight) is 0, so there is nothing to train."
            )
        if self.teacher_top_k < 1:
            raise ValueError(f"DistillDPOConfig.teacher_top_k must be >= 1, got {self.teacher_top_k}.")
        if self.adpa_responses not in ADPA_RESPONSES:
            raise ValueError(
                f"DistillDPOConfig.adpa_responses={self.adpa_responses!r} is not one of {ADPA_RESPONSES}."
            )
        if self.adpa_max_new_tokens < 1:
            raise ValueError(f"DistillDPOConfig.adpa_max_new_tokens must be >= 1, got {self.adpa_max_new_tokens}.")
        if self.advantage_clamp is not None:
            if len(self.advantage_clamp) != 2 or not self.advantage_clamp[0] < self.advantage_clamp[1]:
                raise ValueError(
                    f"DistillDPOConfig.advantage_clamp must be [lo, hi] with lo < hi, got {self.advantage_clamp}."
                )
            self.advantage_clamp = [float(bound) for bound in self.advantage_clamp]
        if self.sync_ref_model:
            raise ValueError(
                "DistillDPOConfig.sync_ref_model=True would blend the student into the teacher (the reference): "
                "the teacher stays fixed in distillation. Set sync_ref_model=False."
            )
        super().__post_init__()


def adpa_advantage_term(
    student_logits: torch.Tensor,
    aligned_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    top_k: int,
    advantage_clamp: list[float] | tuple[float, float] | None = None,
    num_items: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ADPA's advantage term on `[N, V]` logits of N response positions (arXiv 2502.17927, SPEC section 5).

    Returns `(loss, mean_advantage)` with `loss = -(1/n) sum_t sum_{a in top-k} q(a|s_t) A(s_t, a)`, `n = num_items`
    when given (e.g. 1 for the sum), else N; where
    `A = log pi_aligned(a|s_t) - log pi_ref(a|s_t)`, the actions `a` are the aligned teacher's top-k tokens and `q` is
    the student's full softmax. Gradients flow into `student_logits` only.
    """
    aligned = losses.teacher_topk(aligned_logits, top_k)  # detached; sorted ids and aligned log-probs
    reference_logprobs = reference_logits.detach().float().log_softmax(-1).gather(-1, aligned.ids)
    advantage = aligned.logprobs.float() - reference_logprobs
    if advantage_clamp is not None:
        advantage = advantage.clamp(min=advantage_clamp[0], max=advantage_clamp[1])
    student_probs = student_logits.float().softmax(-1).gather(-1, aligned.ids)
    if student_probs.shape[0] == 0:  # no response token in this batch: contribute an exact zero, keep the graph
        return student_logits.sum() * 0.0, advantage.sum() * 0.0
    denominator = student_probs.shape[0] if num_items is None else num_items
    return -(student_probs * advantage).sum() / denominator, advantage.mean()


class _FirstBackboneOutput(contextlib.AbstractContextManager):
    """Keeps the `last_hidden_state` of the first forward of `backbone` run inside the `with` block.

    TRL's fused LM head runs the backbone and turns its output into log-probs without building logits; this hook lets
    the distillation terms project that same output (with its graph) on the completion positions only.
    """

    def __init__(self, backbone: torch.nn.Module):
        self.backbone, self.hidden, self._handle = backbone, None, None

    def _keep(self, module, args, output):
        if self.hidden is None:
            self.hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]

    def __enter__(self):
        self._handle = self.backbone.register_forward_hook(self._keep)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        return False


def _backbone(model) -> torch.nn.Module:
    """The decoder stack whose output TRL's fused LM head projects (`PreTrainedModel.base_model`)."""
    return causal_lm(model, allow_prompt_learning=True).base_model


def _logits_at(model, hidden: torch.Tensor, positions: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """Output-head logits `[N, V]` at the `[B, L-1]` boolean `positions` only (position t predicts token t+1)."""
    head = output_head(model)
    logits = head(hidden[:, :-1][positions].to(head.weight.device))
    return logits if columns is None else logits[:, :columns]


class DistillDPOTrainer(TeacherTrainerMixin, DistillTrainerMixin, DPOTrainer):
    """TRL's [`DPOTrainer`] with a teacher: the teacher is the DPO reference, and DCKD / ADPA terms distill it.

    Args are those of `DPOTrainer` except `ref_model`, replaced by `teacher_model`: a model, a local path or a Hub id
    (default `args.teacher_model_name_or_path`), loaded through [`trl_distill.teacher.load_teacher`] (4-bit and a
    frozen LoRA adapter on request, see [`DistillDPOConfig`]). The teacher and the student must share a tokenizer.
    With no teacher at all, `mode="dckd"` trains from preference data scored by `trl-distill teacher-topk`
    ([`trl_distill.offline_teacher.check_dpo_run`], docs/offline_teacher.md): the KL terms read the stored top-k and
    DPO's reference log-probs are the stored teacher's, so no reference model is created.

    Logged metrics (train and eval): everything TRL's DPO logs (`rewards/chosen`, `rewards/rejected`,
    `rewards/margins`, `rewards/accuracies`, `logps/*`, ...; rewards measured against the teacher reference) and, for
    each distillation term with a non-zero weight, its unweighted value: `distill/dpo_loss`, `distill/sft_loss`,
    `distill/kl_chosen`, `distill/kl_rejected`, `distill/adpa_loss`, `distill/advantage` (mean advantage over the
    top-k actions) and `distill/adpa_response_length` with student responses.
    """

    _tag_names = ["trl", "trl-distill", "dpo", "distill-dpo"]
    _name = "DistillDPO"
    _card_trl_fields = ("beta", "loss_type", "precompute_ref_log_probs")
    _paper = {
        "title": "Advantage-Guided Distillation for Preference Alignment in Small Language Models",
        "id": "2502.17927",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{gao2025advantage,
                title        = {{Advantage-Guided Distillation for Preference Alignment in Small Language Models}},
                author       = {Shiping Gao and Fanqi Wan and Jiajian Guo and Xiaojun Quan and Qifan Wang},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2502.17927},
            }"""),
    }

    def __init__(self, model, teacher_model=None, args: DistillDPOConfig | None = None, **kwargs):
        self._require_config(args, DistillDPOConfig)
        if kwargs.get("ref_model") is not None:
            raise ValueError(
                "DistillDPOTrainer takes no `ref_model`: the teacher is the reference. Pass it as `teacher_model`."
            )
        kwargs.pop("ref_model", None)
        processing_class = kwargs.get("processing_class")
        # Offline: no teacher anywhere (`_load_teacher` would require one); its top-k and log-probs come with the data.
        stored = teacher_model is None and args.teacher_model_name_or_path is None
        if stored:
            self.stored_teacher_info = offline_teacher.check_dpo_run(args, processing_class, kwargs)
            # The stored sequence log-probs are TRL's precomputed reference (see `_precompute_ref_logps`), and the
            # collator needs the stored columns that TRL's signature columns would drop.
            args.precompute_ref_log_probs, args.remove_unused_columns = True, False
        validate_datasets(
            "DistillDPOTrainer",
            processing_class,
            kwargs.get("train_dataset"),
            kwargs.get("eval_dataset"),
            formats=PREFERENCE_FORMATS,
        )
        teacher = None if stored else self._load_teacher(teacher_model, args, processing_class)
        if args.adpa_weight and not is_peft_model(teacher):
            raise ValueError(
                "DistillDPOConfig.adpa_weight > 0 needs a teacher with a LoRA adapter (`teacher_adapter=...` or a "
                "PeftModel teacher): adapter on is the aligned teacher, adapter off the reference teacher."
            )
        # Fail before TRL tokenizes the data and runs the teacher on it (precompute_ref_log_probs) when we can.
        if processing_class is not None and not isinstance(model, str):
            tokenizer = getattr(processing_class, "tokenizer", processing_class)
            check_vocab_compatible(tokenizer, student_model=model, teacher_model=teacher)

        # TRL patches `ref_model.forward` with its fused LM head and expects a transformers model there: hand it the
        # model under the PEFT wrapper, whose LoRA layers stay live, i.e. the aligned teacher (adapter on).
        super().__init__(model, ref_model=None if stored else causal_lm(teacher), args=args, **kwargs)
        disable_cpu_4bit_packing(self.model)  # a QLoRA student on CPU would lose its gradients after no-grad passes
        if stored:  # the collator turns the stored columns into the teacher's top-k and TRL's ref_*_logps
            self.teacher_model = self._prepare_stored_teacher(self.stored_teacher_info)
            self.data_collator = offline_teacher.StoredPreferenceTeacherCollator(
                self.data_collator, self.stored_teacher_info.top_k
            )
        else:
            self.teacher_model = self._prepare_teacher(teacher, placement=None)  # TRL placed it as `ref_model`
        self._set_up_distillation_terms(args)

    def _set_up_distillation_terms(self, args: DistillDPOConfig) -> None:
        """What the DCKD / ADPA terms need beyond TRL's DPO: plain logits and the greedy generation settings."""
        if any((args.sft_weight, args.chosen_kd_weight, args.rejected_kd_weight, args.adpa_weight)):
            # The terms project backbone outputs through the heads; softcapped or scaled logits would differ.
            for distilled in (self.model, self.teacher_model):
                if distilled is not None:  # no teacher model: a stored teacher
                    check_plain_logits(causal_lm(distilled))
        self._adds_distillation_terms = any(
            (args.sft_weight, args.chosen_kd_weight, args.rejected_kd_weight, args.adpa_weight)
        ) or args.dpo_weight != 1.0
        self._adpa_generation_config = GenerationConfig(
            max_new_tokens=args.adpa_max_new_tokens,
            do_sample=False,
            pad_token_id=self._tokenizer.pad_token_id,
            eos_token_id=self._tokenizer.eos_token_id,
        )

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if getattr(self, "stored_teacher_info", None) is not None:
            return dataset  # the collator turns the stored teacher's sequence log-probs into ref_*_logps
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        if not self._adds_distillation_terms:
            # teacher_ref with no extra term: exactly TRL's DPO loss, the teacher being `ref_model`.
            result = super()._compute_loss(model, inputs, return_outputs)
            loss, outputs = result if return_outputs else (result, None)
            loss = self._check_finite(loss, model, name="dpo_loss")
            return (loss, outputs) if return_outputs else loss

        args = self.args
        metric_mode = "train" if self.model.training else "eval"
        student = self.accelerator.unwrap_model(model)
        stored = self.teacher_model is None  # offline: the stored teacher comes with the batch
        teacher_hook = contextlib.nullcontext() if stored else _FirstBackboneOutput(_backbone(self.teacher_model))
        with _FirstBackboneOutput(_backbone(student)) as student_out, teacher_hook as teacher_out:
            result = super()._compute_loss(model, inputs, return_outputs)
        dpo_loss, outputs = result if return_outputs else (result, None)
        # A zero weight keeps DPO's rewards/margins as metrics without back-propagating through its graph.
        loss = dpo_loss * args.dpo_weight if args.dpo_weight else dpo_loss.detach() * 0.0
        terms = {"dpo_loss": dpo_loss.detach()}

        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        completion_mask = inputs["completion_mask"]
        half = input_ids.size(0) // 2  # TRL's batch is [chosen; rejected]
        positions = completion_mask[:, 1:].bool()  # position t predicts completion token t+1
        targets = input_ids[:, 1:][positions]
        row_of_position = torch.arange(input_ids.size(0), device=input_ids.device)[:, None].expand_as(positions)
        is_chosen = row_of_position[positions] < half
        columns = self.vocab_columns
        uses_rejected_adpa = args.adpa_weight and args.adpa_responses == "rejected"
        uses_teacher_on_batch = args.chosen_kd_weight or args.rejected_kd_weight or uses_rejected_adpa
        if args.sft_weight or uses_teacher_on_batch:
            # Prompt-learning PEFT prepends virtual tokens to the backbone output; keep the real positions, as TRL.
            student_hidden = student_out.hidden[:, -input_ids.size(1):]
            student_logits = _logits_at(student, student_hidden, positions)

        # Token-level terms: logged as this micro-batch's means; trained as shares of the whole step's means.
        n_chosen, n_rejected = int(is_chosen.sum()), int((~is_chosen).sum())
        if args.sft_weight:
            total = F.cross_entropy(student_logits[is_chosen].float(), targets[is_chosen], reduction="sum")
            terms["sft_loss"] = total.detach() / max(n_chosen, 1)
            loss = loss + args.sft_weight * self._token_mean(total, "chosen", n_chosen)

        if uses_teacher_on_batch and stored:  # [N, k] stored top-k at the same completion positions
            teacher_logits = offline_teacher.stored_teacher(inputs).select(positions)
        elif uses_teacher_on_batch:
            with torch.no_grad():
                teacher_hidden = teacher_out.hidden  # None with precompute_ref_log_probs: no reference forward ran
                if teacher_hidden is None:
                    teacher_hidden = backbone_hidden_states(self.teacher_model, input_ids, attention_mask)
                teacher_logits = _logits_at(self.teacher_model, teacher_hidden, positions, columns)
                teacher_logits = teacher_logits.to(student_logits.device)
        if uses_teacher_on_batch:
            for name, weight, rows, group, count in (
                ("kl_chosen", args.chosen_kd_weight, is_chosen, "chosen", n_chosen),
                ("kl_rejected", args.rejected_kd_weight, ~is_chosen, "rejected", n_rejected),
            ):
                if weight:
                    teacher_rows = teacher_logits.select(rows) if stored else teacher_logits[rows]
                    total = losses.forward_kl(
                        student_logits[rows, :columns], teacher_rows, teacher_top_k=args.teacher_top_k, num_items=1,
                    )
                    terms[name] = total.detach() / max(count, 1)
                    loss = loss + weight * self._token_mean(total, group, count)

        if args.adpa_weight:
            if uses_rejected_adpa:
                with torch.no_grad(), adapter_disabled(self.teacher_model):
                    reference_hidden = backbone_hidden_states(
                        self.teacher_model, input_ids[half:], attention_mask[half:]
                    )
                    reference_logits = _logits_at(self.teacher_model, reference_hidden, positions[half:], columns)
                adpa_total, advantage = adpa_advantage_term(
                    student_logits[~is_chosen, :columns],
                    teacher_logits[~is_chosen],
                    reference_logits.to(student_logits.device),
                    args.teacher_top_k,
                    args.advantage_clamp,
                    num_items=1,
                )
                terms["adpa_loss"] = adpa_total.detach() / max(n_rejected, 1)
                adpa_loss = self._token_mean(adpa_total, "rejected", n_rejected)
            else:
                # The student's responses exist only once it has generated them, micro-batch by micro-batch, so
                # this term is the mean over each micro-batch's response tokens (no whole-step count to divide by).
                adpa_loss, advantage, response_length = self._adpa_on_student_responses(model, student, inputs)
                terms["adpa_response_length"] = response_length
                terms["adpa_loss"] = adpa_loss.detach()
            terms["advantage"] = advantage.detach()
            loss = loss + args.adpa_weight * adpa_loss

        for name, value in terms.items():
            value = self.accelerator.gather_for_metrics(value.detach().float().reshape(1)).mean()
            self._metrics[metric_mode][f"distill/{name}"].append(value.item())
        self._watch_terms(terms)
        loss = self._check_finite(loss, model, name="DistillDPO loss")
        return (loss, outputs) if return_outputs else loss

    def _count_step_tokens(self, batch_samples):
        if not self._adds_distillation_terms:
            return None  # teacher_ref alone: TRL's DPO loss, untouched
        chosen = rejected = 0
        for batch in batch_samples:
            positions = batch["completion_mask"][:, 1:]  # position t predicts completion token t+1
            half = positions.size(0) // 2  # [chosen; rejected]
            chosen, rejected = chosen + positions[:half].sum(), rejected + positions[half:].sum()
        return {"chosen": chosen, "rejected": rejected}

    def _adpa_on_student_responses(self, model, student, inputs):
        """ADPA's term on the student's own greedy responses to the batch's prompts (the paper's setting)."""
        input_ids, attention_mask, completion_mask = self._student_responses(model, inputs)
        positions = completion_mask[:, 1:].bool()
        columns = self.vocab_columns
        student_logits = _logits_at(
            student, backbone_hidden_states(student, input_ids, attention_mask), positions, columns
        )
        with torch.no_grad():
            aligned_hidden = backbone_hidden_states(self.teacher_model, input_ids, attention_mask)
            aligned_logits = _logits_at(self.teacher_model, aligned_hidden, positions, columns)
            with adapter_disabled(self.teacher_model):
                reference_hidden = backbone_hidden_states(self.teacher_model, input_ids, attention_mask)
                reference_logits = _logits_at(self.teacher_model, reference_hidden, positions, columns)
        adpa_loss, advantage = adpa_advantage_term(
            student_logits,
            aligned_logits.to(student_logits.device),
            reference_logits.to(student_logits.device),
            self.args.teacher_top_k,
            self.args.advantage_clamp,
        )
        return adpa_loss, advantage, completion_mask.sum(1).float().mean()

    def _student_responses(self, model, inputs):
        """Greedy student responses to the prompts of the batch's chosen half, as a right-padded batch of
        prompt + response with its completion mask (response tokens up to and including the first EOS)."""
        half = inputs["input_ids"].size(0) // 2
        prompt_mask = (inputs["attention_mask"][:half] == 1) & (inputs["completion_mask"][:half] == 0)
        prompts = [row[keep] for row, keep in zip(inputs["input_ids"][:half], prompt_mask, strict=True)]
        pad_id, eos_id = self._tokenizer.pad_token_id, self._tokenizer.eos_token_id
        prompt_ids = pad(prompts, padding_value=pad_id, padding_side="left")  # generation continues on the right
        prompt_attention = pad([torch.ones_like(p) for p in prompts], padding_value=0, padding_side="left")
        with (
            unwrap_model_for_generation(
                model, self.accelerator, gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs
            ) as unwrapped,
            torch.no_grad(),
            eval_mode(unwrapped),  # greedy means deterministic: no dropout even when `disable_dropout=False`
        ):
            generated = unwrapped.generate(
                input_ids=prompt_ids, attention_mask=prompt_attention, generation_config=self._adpa_generation_config
            )
        sequences, masks = [], []
        for prompt, response in zip(prompts, generated[:, prompt_ids.size(1):], strict=True):
            ends = (response == eos_id).nonzero()
            if len(ends):  # generate pads finished rows after their EOS
                response = response[: ends[0, 0] + 1]
            sequences.append(torch.cat([prompt, response]))
            masks.append(torch.cat([torch.zeros_like(prompt), torch.ones_like(response)]))
        # Right padding, as TRL's collator: models derive positions from the left edge, not the attention mask.
        input_ids = pad(sequences, padding_value=pad_id, padding_side="right")
        attention_mask = pad([torch.ones_like(s) for s in sequences], padding_value=0, padding_side="right")
        completion_mask = pad(masks, padding_value=0, padding_side="right")
        return input_ids, attention_mask, completion_mask
