"""GKDVariant: TRL's GKD trainer with more divergences, a top-k teacher, a chunked loss and a 4-bit teacher.

`GKDTrainer` -> `GKDVariant` (and `GKDConfig` -> `GKDVariantConfig`) is the only change a TRL GKD script needs.
With the defaults (`loss_type="jsd"`, `loss_temperature=1.0`, no top-k) the loss is TRL's `generalized_jsd_loss`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import torch
from trl.experimental.gkd import GKDConfig, GKDTrainer
from trl.experimental.utils import DataCollatorForChatML
from trl.trainer.sft_trainer import SFTTrainer
from trl.trainer.utils import disable_dropout_in_model

from .. import losses, offline_teacher
from .._compat import ForwardRedirection
from ._common import DistillArguments, DistillTrainerMixin
from ._generation import OnPolicyGenerationArguments, OnPolicyGenerationMixin
from ._sft import check_divergence_fields, divergence_loss_type
from ._teacher import TeacherArguments, TeacherTrainerMixin
from ..teacher import backbone_hidden_states, disable_cpu_4bit_packing, output_head
from ..validation import validate_datasets



@dataclass
class GKDVariantConfig(TeacherArguments, DistillArguments, OnPolicyGenerationArguments, GKDConfig):
    r"""
    Configuration for [`GKDVariant`]. Every field of TRL's `GKDConfig` keeps its meaning; the fields below are added,
    with `overwrite_output_dir` and `on_nonfinite` shared by every trl-distill config (see [`DistillArguments`]), and
    TRL `DistillationConfig`'s sampling fields with its names and defaults (`top_p`, `top_k`, `min_p`,
    `repetition_penalty`, `generation_kwargs`, `cache_implementation`, `use_vllm` and the `vllm_*` fields,
    `log_completions`, `num_completions_to_print`; see [`OnPolicyGenerationArguments`]). `temperature` (GKD's
    default 0.9) and `max_new_tokens` stay GKDConfig's.

    Args:
        loss_type (`str`, *optional*, defaults to `"jsd"`):
            Token-level divergence between teacher `p` and student `q`, one of `"forward_kl"`, `"reverse_kl"`,
            `"jsd"` (TRL's generalized JSD, parameter `beta`), `"skew_kl"`, `"skew_rkl"`
            ([DistiLLM](https://huggingface.co/papers/2402.03898), parameter `skew_alpha`), `"tvd"`, `"akl"`
            ([AKL](https://huggingface.co/papers/2404.02657), parameter `akl_mu`). This replaces SFTConfig's
            `loss_type` (`"nll"`/`"dft"`), which GKD never used.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Mixing weight of the skew divergences: `skew_kl = KL(p || a*p + (1-a)*q)`.
        akl_mu (`float`, *optional*, defaults to `0.5`):
            Cumulative teacher mass that separates AKL's head from its tail.
        loss_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature applied to teacher and student logits alike inside the divergence. TRL's `temperature`
            (default 0.9) stays the *sampling* temperature for on-policy generation: TRL's GKD never scales the
            divergence by it, so the default 1.0 reproduces TRL's GKD loss exactly.
        teacher_top_k (`int` or `None`, *optional*, defaults to `None`):
            Keep only the teacher's k most likely tokens plus a "rest" bucket holding the remaining mass (on both
            sides). `None` compares the full distributions.
        loss_chunk_size (`int` or `None`, *optional*, defaults to `256`):
            Number of completion rows projected to vocabulary logits at a time. The chunked path never builds the
            full `[B*T, V]` logits of either model. `None` or `0` uses the dense path (full logits from `model()`).

    The teacher fields (`teacher_model_name_or_path`, `teacher_model_revision`, `teacher_model_init_kwargs`,
    `teacher_quantization`, `teacher_adapter`) are those of every config with a teacher (see [`TeacherArguments`]).
    """

    loss_type: str = field(
        default="jsd",
        metadata={"help": f"Token-level divergence, one of {', '.join(losses.LOSS_TYPES)}."},
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "Mixing weight of skew_kl / skew_rkl."})
    akl_mu: float = field(default=0.5, metadata={"help": "Teacher cumulative mass separating AKL head and tail."})
    loss_temperature: float = field(
        default=1.0,
        metadata={"help": "Temperature of teacher and student logits in the divergence (`temperature` samples)."},
    )
    teacher_top_k: int | None = field(
        default=None, metadata={"help": "Compare only the teacher's top-k tokens plus a rest bucket."}
    )
    loss_chunk_size: int | None = field(
        default=256, metadata={"help": "Rows per chunk of the chunked loss; None or 0 for the dense loss."}
    )

    _VALID_DICT_FIELDS = GKDConfig._VALID_DICT_FIELDS + ["generation_kwargs"]

    def __post_init__(self):
        # Our own fields first: the parents' checks (e.g. bf16 on a CPU machine) must not hide a wrong one of ours.
        check_divergence_fields(self)
        if self.teacher_top_k is not None and self.teacher_top_k < 1:
            raise ValueError(f"GKDVariantConfig.teacher_top_k must be >= 1 or None, got {self.teacher_top_k}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 0:
            raise ValueError(f"GKDVariantConfig.loss_chunk_size must be >= 0 or None, got {self.loss_chunk_size}.")
        self.check_generation_fields("GKDVariantConfig")
        super().__post_init__()


class GKDVariant(TeacherTrainerMixin, DistillTrainerMixin, OnPolicyGenerationMixin, GKDTrainer):
    """TRL's [`GKDTrainer`] with seven divergences, a top-k teacher, a chunked loss and a 4-bit teacher.

    Args are those of `GKDTrainer`; `teacher_model` may be a model, a path or a Hub id, or None to use
    `GKDVariantConfig.teacher_model_name_or_path`. It is loaded through the shared teacher set-up (docs/teacher.md:
    tokenizer and vocabulary checks, 4-bit and a frozen adapter on request, see [`GKDVariantConfig`]). With neither,
    it trains off-policy (`lmbda=0`, no `seq_kd`) from a stored teacher: a dataset scored by
    `trl-distill teacher-topk` ([`trl_distill.offline_teacher`], docs/offline_teacher.md).

    Logged metrics (train and eval): `divergence` (the loss without normalisation tricks), `teacher_agreement`
    (fraction of completion tokens where teacher and student argmax agree), `on_policy_fraction` (fraction of
    batches whose completions the student generated) and TRL's `num_tokens`.
    """

    _tag_names = ["trl", "trl-distill", "gkd", "gkd-variant"]
    _name = "GKDVariant"
    _card_trl_fields = ("lmbda", "beta", "seq_kd", "temperature", "max_new_tokens")

    def __init__(self, model=None, teacher_model=None, args: GKDVariantConfig | None = None, **kwargs):
        self._require_config(args, GKDVariantConfig)
        processing_class = kwargs.get("processing_class")
        if processing_class is None:
            raise ValueError("GKDVariant needs `processing_class` (the student's tokenizer).")
        # offline: no teacher anywhere, its top-k come with the dataset (`_load_teacher` would require one)
        stored = teacher_model is None and args.teacher_model_name_or_path is None
        if stored:
            self.stored_teacher_info = offline_teacher.check_gkd_run(args, processing_class, kwargs)

        # GKD's default collator (DataCollatorForChatML) reads the raw `messages` column of every row.
        validate_datasets(
            "GKDVariant",
            processing_class,
            kwargs.get("train_dataset"),
            kwargs.get("eval_dataset"),
            formats=(("messages",),) if kwargs.get("data_collator") is None else None,
            hint="GKD trains on conversations: a `messages` list of role/content dicts ending with the completion.",
        )
        if not stored:
            teacher_model = self._load_teacher(teacher_model, args, processing_class)

        # Mirrors GKDTrainer's own set-up: the collator needs the raw `messages` column.
        args.remove_unused_columns = False
        if kwargs.get("data_collator") is None:
            kwargs["data_collator"] = DataCollatorForChatML(tokenizer=processing_class, max_length=args.max_length)
        if stored:  # the stored columns ride along the collator's truncation, as its labels
            kwargs["data_collator"] = offline_teacher.StoredTeacherCollator(
                kwargs["data_collator"], self.stored_teacher_info.top_k
            )
        args.dataset_kwargs = {**(args.dataset_kwargs or {}), "skip_prepare_dataset": True}

        # GKDTrainer.__init__ would reject any difference in `config.vocab_size`, which also rejects real pairs
        # whose heads are only padded differently (e.g. Qwen2.5-0.5B vs -7B). `_prepare_teacher` checks the
        # vocabulary instead, so run SFT's init and set up GKD's state here.
        with divergence_loss_type(args):
            SFTTrainer.__init__(self, model, args=args, **kwargs)
        # bitsandbytes' packed CPU path (taken by no-grad passes such as generation) drops a QLoRA student's gradients
        disable_cpu_4bit_packing(self.model)
        if args.disable_dropout:
            disable_dropout_in_model(self.model)
        if stored:
            self.teacher_model = self._prepare_stored_teacher(self.stored_teacher_info)
        else:
            self.teacher_model = self._prepare_teacher(teacher_model)
        self._set_up_generation(args)

    def _set_up_generation(self, args: GKDVariantConfig) -> None:
        """GKDTrainer's state for its on-policy / sequence-level KD mixture (what its skipped `__init__` sets)."""
        self.lmbda = args.lmbda
        self.beta = args.beta
        self.temperature = args.temperature
        self.seq_kd = args.seq_kd
        self._setup_generation(args.max_new_tokens)  # HF GenerationConfig, or TRL's VLLMGeneration (use_vllm)
        self._forward_redirection = ForwardRedirection()

    # ------------------------------------------------------------------ data
    def training_step(self, model, inputs, num_items_in_batch=None):
        """GKD's mixture: with probability `lmbda` the student writes the completions, else (with `seq_kd`) the
        teacher does, else the dataset's completions are used. Records which one happened."""
        on_policy = random.random() < self.lmbda
        generator = None
        if on_policy:
            generator = model
        elif self.seq_kd:
            generator = self.teacher_model  # always HF generate: vLLM serves the student only
        if generator is not None:
            ids, attention_mask, labels = self._sample(generator, inputs, on_policy)
            inputs = {**inputs, "input_ids": ids, "attention_mask": attention_mask, "labels": labels}
        self._metrics["train"]["on_policy_fraction"].append(float(on_policy))
        return SFTTrainer.training_step(self, model, inputs, num_items_in_batch)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.loss_chunk_size:
            # Run the backbones + chunked loss inside the wrapper's forward so DDP/FSDP see a forward pass.
            unwrapped = self.accelerator.unwrap_model(model)
            loss, stats = self._forward_redirection(
                model, unwrapped, self._chunked_loss, unwrapped, inputs, num_items_in_batch
            )
            outputs = None
        else:
            loss, stats, outputs = self._dense_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss (which this replaces): `num_items_in_batch` counts every process's tokens and
            # DDP averages the gradients, so scale back up or N processes would train (and log) at 1/N the loss.
            loss = loss * self.accelerator.num_processes

        mode = "train" if self.model.training else "eval"
        divergence, agreement = self.accelerator.gather_for_metrics(
            torch.stack([stats["divergence"], stats["agreement"]]).float().unsqueeze(0)
        ).mean(0)
        self._metrics[mode]["divergence"].append(divergence.item())
        self._metrics[mode]["teacher_agreement"].append(agreement.item())
        self._log_num_tokens(inputs, mode)
        loss = self._check_finite(loss, model, name=f"{self.args.loss_type} divergence")
        return (loss, outputs) if return_outputs else loss

    def _loss_kwargs(self) -> dict[str, Any]:
        return {
            "temperature": self.args.loss_temperature,
            "teacher_top_k": self.args.teacher_top_k,
            "beta": self.args.beta,
            "alpha": self.args.skew_alpha,
            "mu": self.args.akl_mu,
        }

    def _chunked_loss(self, student, inputs, num_items_in_batch):
        # Position t predicts token t+1: drop the last hidden state, compare against labels[1:].
        mask = inputs["labels"][:, 1:] != -100
        student_hidden = backbone_hidden_states(student, inputs["input_ids"], inputs["attention_mask"])[:, :-1]
        student_head = output_head(student)
        columns = self.vocab_columns  # heads padded past the shared tokenizer are compared on its columns only
        if self.teacher_model is None:  # offline: the stored teacher's top-k, no teacher forward
            teacher_head, stored = None, offline_teacher.stored_teacher(inputs)
            self._watch_terms({"student hidden states": student_hidden})
        else:
            with torch.no_grad():
                teacher_hidden = backbone_hidden_states(
                    self.teacher_model, inputs["input_ids"], inputs["attention_mask"]
                )[:, :-1]
            teacher_head = output_head(self.teacher_model)
            teacher_hidden = teacher_hidden.to(student_hidden.device)
            self._watch_terms({"student hidden states": student_hidden, "teacher hidden states": teacher_hidden})

        def chunked_loss():  # reads the heads' weights inside their forward, where ZeRO-3 has gathered them
            if teacher_head is None:
                teacher = {"teacher_logits": stored}
            else:
                teacher = {
                    "teacher_hidden": teacher_hidden,
                    "teacher_weight": teacher_head.weight[:columns].to(student_hidden.device),
                    "teacher_bias": None if teacher_head.bias is None else teacher_head.bias[:columns],
                }
            return losses.chunked_divergence(
                self.args.loss_type,
                student_hidden,
                student_head.weight[:columns],
                student_bias=None if student_head.bias is None else student_head.bias[:columns],
                mask=mask,
                num_items=num_items_in_batch,
                chunk_size=self.args.loss_chunk_size,
                return_stats=True,
                **teacher,
                **self._loss_kwargs(),
            )

        if teacher_head is None:
            return self._forward_redirection(student_head, student_head, chunked_loss)  # gathers ZeRO-3 head shards
        return self._as_heads_forward(student_head, teacher_head, chunked_loss)

    def _dense_loss(self, model, inputs, num_items_in_batch):
        model_inputs = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
        outputs = model(**model_inputs, use_cache=False)
        columns = self.vocab_columns
        student_logits = outputs.logits[:, :-1, :columns]
        if self.teacher_model is None:
            teacher_logits = offline_teacher.stored_teacher(inputs)  # TopKTeacher over [B, L-1]
        else:
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs, use_cache=False).logits
            teacher_logits = teacher_logits[:, :-1, :columns].to(student_logits.device)
        mask = inputs["labels"][:, 1:] != -100
        self._watch_terms({"student logits": student_logits,
                           "teacher logits": getattr(teacher_logits, "logprobs", teacher_logits)})
        loss = losses.divergence(
            self.args.loss_type,
            student_logits,
            teacher_logits,
            mask=mask,
            num_items=num_items_in_batch,
            **self._loss_kwargs(),
        )
        with torch.no_grad():
            n = mask.sum().clamp(min=1)
            agree = (student_logits.argmax(-1) == losses._teacher_argmax(teacher_logits)) & mask
            divergence = loss.detach() if num_items_in_batch is None else loss.detach() * num_items_in_batch / n
            stats = {"divergence": divergence, "agreement": agree.sum() / n}
        return loss, stats, outputs


