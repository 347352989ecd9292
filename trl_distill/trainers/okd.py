"""OKDTrainer: online knowledge distillation with a trainable LoRA "online module" on a frozen (4-bit) teacher.

Rao et al., [arXiv 2409.12512](https://huggingface.co/papers/2409.12512). Each step, on the ground-truth batch, one
forward of each model:

    L_student = D(p_teacher+lora || q_student)                          (teacher detached; D = forward KL by default)
    L_teacher = alpha * KL(q_student || p_teacher+lora) + (1 - alpha) * CE(p_teacher+lora, y)   (student detached)

The student trains with the Trainer's optimizer; the teacher's adapter with its own optimizer and scheduler, stepped
with the student's. `SFTTrainer` -> `OKDTrainer` (and `SFTConfig` -> `OKDConfig`, plus `teacher_model=`) is the only
change an SFT script needs.
"""

from __future__ import annotations

import os
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback, get_scheduler, set_seed
from trl.trainer.sft_config import SFTConfig
from trl.trainer.sft_trainer import SFTTrainer

from .. import losses
from .._compat import ForwardRedirection
from ._common import DistillArguments, DistillTrainerMixin
from ._sft import check_divergence_fields, divergence_loss_type
from ._teacher import TeacherArguments, TeacherTrainerMixin
from ..teacher import backbone_hidden_states, disable_cpu_4bit_packing, output_head
from ..validation import SFT_FORMATS, validate_datasets

TEACHER_UPDATES = ("online", "frozen")

# Files written next to the student in every checkpoint (and, for the adapter, by `save_model`).
TEACHER_ADAPTER_DIR = "teacher_adapter"
TEACHER_OPTIMIZER_NAME = "teacher_optimizer.pt"
TEACHER_SCHEDULER_NAME = "teacher_scheduler.pt"


@dataclass
class OKDConfig(TeacherArguments, DistillArguments, SFTConfig):
    r"""
    Configuration for [`OKDTrainer`], online knowledge distillation
    ([Rao et al., 2024](https://huggingface.co/papers/2409.12512)). Every field of TRL's `SFTConfig` keeps its meaning
    (dataset formats, collator, `max_length`, `completion_only_loss`, ...); the fields below are added, with
    `overwrite_output_dir` and `on_nonfinite` shared by every trl-distill config (see [`DistillArguments`]).

    Args:
        teacher_update (`str`, *optional*, defaults to `"online"`):
            `"online"` trains the teacher's LoRA online module with the teacher loss (OKD). `"frozen"` never updates
            the teacher: plain off-policy KD from the frozen teacher (with `teacher_adapter` loaded if given), the
            baseline OKD is compared against.
        teacher_lora_r (`int`, *optional*, defaults to `32`):
            Rank of the fresh LoRA online module (the paper's default).
        teacher_lora_alpha (`int`, *optional*, defaults to `64`):
            LoRA scaling numerator of the online module.
        teacher_lora_dropout (`float`, *optional*, defaults to `0.05`):
            Dropout on the online module's input.
        teacher_lora_target_modules (`list[str]`, *optional*, defaults to `["q_proj", "v_proj"]`):
            Modules of the teacher that get the online module. A full `peft.PeftConfig` can be passed to the trainer
            as `teacher_peft_config` instead of the four `teacher_lora_*` fields.
        teacher_learning_rate (`float` or `None`, *optional*, defaults to `None`):
            Learning rate of the teacher adapter's optimizer. `None` uses `learning_rate`, as the paper does. Its
            scheduler has the student's type (`lr_scheduler_type`), warm-up and length.
        alpha (`float`, *optional*, defaults to `0.1`):
            Weight of the distillation term in the teacher loss,
            `alpha * KL(q_student || p_teacher) + (1 - alpha) * CE(p_teacher, y)`. The paper gives no value. A large
            alpha can drag the teacher toward the (weaker) student; on the shipped addition task the effect of alpha
            was not consistent across seeds (`docs/okd.md`, "Choosing alpha"): tune it on held-out data.
        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            Student loss, a divergence from the teacher to the student, one of `"forward_kl"` (the paper's
            `KL(p_teacher || q_student)`), `"reverse_kl"`, `"jsd"` (parameter `beta`), `"skew_kl"`, `"skew_rkl"`
            (parameter `skew_alpha`), `"tvd"`, `"akl"` (parameter `akl_mu`). This replaces SFTConfig's `loss_type`
            (`"nll"`/`"dft"`), which OKD never uses.
        beta (`float`, *optional*, defaults to `0.5`):
            Interpolation of the `"jsd"` student loss (0 = forward KL, 1 = reverse KL, as TRL's GKD).
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Mixing weight of the `"skew_kl"`/`"skew_rkl"` student losses
            ([DistiLLM](https://huggingface.co/papers/2402.03898)).
        akl_mu (`float`, *optional*, defaults to `0.5`):
            Head/tail threshold of the `"akl"` student loss ([AKL](https://huggingface.co/papers/2404.02657)).
        loss_temperature (`float`, *optional*, defaults to `1.0`):
            Temperature applied to both models' logits in the divergences (student loss and the teacher's KL term),
            never in the cross-entropy terms.
        student_ce_weight (`float`, *optional*, defaults to `0.0`):
            Weight of an extra cross-entropy term of the student on the labels. The paper has none.
        loss_chunk_size (`int`, *optional*, defaults to `256`):
            Completion rows projected to vocabulary logits at a time. Neither model's full `[B*T, V]` logits are
            ever built.

    The teacher fields (`teacher_model_name_or_path`, `teacher_model_revision`, `teacher_model_init_kwargs`,
    `teacher_quantization`, `teacher_adapter`) are those of every config with a teacher (see [`TeacherArguments`]).
    Here `teacher_adapter` is an existing teacher adapter: with `teacher_update="online"` it is trained further (e.g.
    the `teacher_adapter/` that `save_model` wrote) instead of a fresh LoRA module; with `"frozen"` it stays frozen.
    """

    teacher_update: str = field(
        default="online",
        metadata={"help": "'online' trains the teacher's LoRA module (OKD); 'frozen' is plain KD from the teacher."},
    )
    teacher_lora_r: int = field(default=32, metadata={"help": "Rank of the teacher's LoRA online module."})
    teacher_lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha of the teacher's online module."})
    teacher_lora_dropout: float = field(default=0.05, metadata={"help": "Dropout of the teacher's online module."})
    teacher_lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "v_proj"],
        metadata={"help": "Teacher modules that get the LoRA online module."},
    )
    teacher_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the teacher adapter; None uses `learning_rate`."}
    )
    alpha: float = field(
        default=0.1, metadata={"help": "Teacher loss = alpha * KL(student || teacher) + (1 - alpha) * CE(teacher)."}
    )
    loss_type: str = field(
        default="forward_kl",
        metadata={"help": f"Student loss, a divergence from the teacher: one of {', '.join(losses.LOSS_TYPES)}."},
    )
    beta: float = field(default=0.5, metadata={"help": "Interpolation of the 'jsd' student loss."})
    skew_alpha: float = field(default=0.1, metadata={"help": "Mixing weight of skew_kl / skew_rkl."})
    akl_mu: float = field(default=0.5, metadata={"help": "Teacher cumulative mass separating AKL head and tail."})
    loss_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of both models' logits in the divergences."}
    )
    student_ce_weight: float = field(
        default=0.0, metadata={"help": "Weight of an extra student cross-entropy term on the labels."}
    )
    loss_chunk_size: int = field(default=256, metadata={"help": "Rows per chunk of the chunked losses."})

    def __post_init__(self):
        # Our own fields first: the parents' checks (e.g. bf16 on a CPU machine) must not hide a wrong one of ours.
        if self.teacher_update not in TEACHER_UPDATES:
            raise ValueError(f"OKDConfig.teacher_update must be one of {TEACHER_UPDATES}, got {self.teacher_update!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"OKDConfig.alpha must be in [0, 1], got {self.alpha}.")
        check_divergence_fields(self)
        if self.student_ce_weight < 0:
            raise ValueError(f"OKDConfig.student_ce_weight must be >= 0, got {self.student_ce_weight}.")
        if self.loss_chunk_size is None or self.loss_chunk_size < 1:
            raise ValueError(f"OKDConfig.loss_chunk_size must be >= 1, got {self.loss_chunk_size}.")
        if self.teacher_learning_rate is not None and self.teacher_learning_rate < 0:
            raise ValueError(f"OKDConfig.teacher_learning_rate must be >= 0, got {self.teacher_learning_rate}.")
        if self.teacher_lora_r < 1:
            raise ValueError(f"OKDConfig.teacher_lora_r must be >= 1, got {self.teacher_lora_r}.")
        if not 0.0 <= self.teacher_lora_dropout < 1.0:
            raise ValueError(f"OKDConfig.teacher_lora_dropout must be in [0, 1), got {self.teacher_lora_dropout}.")
        super().__post_init__()
        # Both backbones run on the padded batch with its attention mask; padding-free batches carry none.
        if self.padding_free or (self.packing and self.packing_strategy in ("bfd", "bfd_split")):
            raise ValueError(
                "OKDConfig does not support padding-free batches (`padding_free=True`, or `packing=True` with the "
                f"{self.packing_strategy!r} strategy): set `padding_free=False`, or `packing_strategy='wrapped'`."
            )


class _TeacherOptimizerStep(TrainerCallback):
    """Steps the teacher adapter's optimizer and scheduler together with the student's (same accumulation, same
    clipping threshold). A callback, because `Trainer` exposes the moment just before and after its optimizer step
    only through callbacks."""

    def __init__(self, trainer: OKDTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # The paper's Algorithm 1 updates the teacher first, then the student. Stepping before the student also keeps
        # one fp16 GradScaler valid for both optimizers: every `scaler.step` must come before the student's
        # `scaler.update()`, which happens inside its (accelerate-wrapped) `optimizer.step()`.
        self.trainer._step_teacher()

    def on_optimizer_step(self, args, state, control, **kwargs):
        # The student's scheduler steps only if its optimizer step was not skipped (fp16 overflow): keep in step.
        if not self.trainer.accelerator.optimizer_step_was_skipped:
            self.trainer.teacher_lr_scheduler.step()


class OKDTrainer(TeacherTrainerMixin, DistillTrainerMixin, SFTTrainer):
    """Online knowledge distillation: the student learns from a teacher whose LoRA online module learns alongside.

    Args are those of TRL's `SFTTrainer` (same datasets and collator), plus:

    - `teacher_model`: a model, a local path or a Hub id (default: `args.teacher_model_name_or_path`), loaded through
      [`trl_distill.teacher.load_teacher`]: frozen base (nf4 with `teacher_quantization="4bit"`) plus the online
      module (a fresh LoRA from the `teacher_lora_*` fields or `teacher_peft_config`, or `teacher_adapter`).
    - `teacher_peft_config`: a `peft.PeftConfig` for the online module instead of the `teacher_lora_*` fields.

    Teacher and student must share a vocabulary (a student head padded larger is allowed). The returned `loss` is
    `L_student + L_teacher` (one backward reaches both models; their parameters are disjoint). Logged metrics (train
    and eval): `loss/student`, `loss/student_ce`, `loss/teacher_kd`, `loss/teacher_ce` (per completion token),
    `mean_token_accuracy` (the student's, TRL's name) and `teacher_token_accuracy` (argmax equals the label),
    `teacher_agreement` (the two argmax agree), TRL's `num_tokens`; in training also `teacher_grad_norm` (before
    clipping) and `teacher_learning_rate`.

    Checkpoints hold the teacher adapter (`teacher_adapter/`), its optimizer and its scheduler, so
    `resume_from_checkpoint` continues exactly; `save_model` writes the student and `teacher_adapter/` beside it.

    Limits: a trainable teacher is not wrapped in DDP; under several processes its (small) adapter gradients are
    averaged across processes by hand before each step. Under DeepSpeed (ZeRO-2/3) the teacher stays outside the
    engine in the same way; FSDP is not supported for the teacher.
    """

    _tag_names = ["trl", "trl-distill", "okd"]
    _name = "OKD"
    _paper = {
        "title": "Exploring and Enhancing the Transfer of Distribution in Knowledge Distillation for Autoregressive Language Models",
        "id": "2409.12512",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{rao2024okd,
                title        = {{Exploring and Enhancing the Transfer of Distribution in Knowledge Distillation for Autoregressive Language Models}},
                author       = {Jun Rao and Xuebo Liu and Zepeng Lin and Liang Ding and Jing Li and Dacheng Tao and Min Zhang},
                year         = 2024,
                eprint       = {arXiv:2409.12512},
            }"""),
    }

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args: OKDConfig | None = None,
        teacher_peft_config=None,
        **kwargs,
    ):
        self._require_config(args, OKDConfig)
        if kwargs.get("processing_class") is None:
            raise ValueError("OKDTrainer needs `processing_class` (the student's tokenizer).")
        if teacher_peft_config is not None and args.teacher_update == "frozen":
            raise ValueError("`teacher_peft_config` configures the online module; OKDConfig.teacher_update='frozen'.")
        validate_datasets(
            "OKDTrainer",
            kwargs.get("processing_class"),
            kwargs.get("train_dataset"),
            kwargs.get("eval_dataset"),
            formats=self._dataset_formats(args, kwargs),
        )

        self.online = args.teacher_update == "online"
        # A fresh online module is drawn here, before Trainer.__init__ seeds: seed first so `args.seed` fixes it.
        set_seed(args.seed)
        teacher_model = self._load_teacher(
            teacher_model,
            args,
            kwargs["processing_class"],
            adapter=self._teacher_adapter(args, teacher_model, teacher_peft_config),
            trainable_adapter=self.online,
        )
        with divergence_loss_type(args):
            super().__init__(model, args=args, **kwargs)
        # bitsandbytes' packed CPU path (taken by no-grad passes such as generation) drops a QLoRA student's gradients
        disable_cpu_4bit_packing(self.model)
        if self.online and args.gradient_checkpointing:
            # The teacher now keeps activations for its adapter's backward: checkpoint them like the student's.
            teacher_model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs
            )
            if hasattr(teacher_model, "enable_input_require_grads"):
                teacher_model.enable_input_require_grads()
        # Device placement (and mixed precision) only: DDP would need every process to own the teacher's graph, and
        # the adapter's gradients are small enough to average by hand (see `_step_teacher`).
        self.teacher_model = self._prepare_teacher(teacher_model, placement="device")
        self._set_up_teacher_training()

    def _teacher_adapter(self, args: OKDConfig, teacher_model, teacher_peft_config):
        """The adapter `load_teacher` attaches: online, the given adapter trained further (a saved one, or the adapter
        of a PeftModel teacher), else a fresh online module; frozen, `teacher_adapter` if any."""
        if not self.online:
            return args.teacher_adapter
        from peft import PeftModel

        if args.teacher_adapter is None and teacher_peft_config is None and isinstance(teacher_model, PeftModel):
            return None
        return args.teacher_adapter or teacher_peft_config or self._online_module_config(args)

    def _set_up_teacher_training(self) -> None:
        """The online module's optimizer (built with the student's) and the callback that steps it."""
        if self.online and self.accelerator.num_processes > 1:
            # What DDP does for the student: start every process from process 0's adapter (a fresh LoRA module is
            # drawn from each process's own random state, which need not agree).
            for _, parameter in self.teacher_parameters:
                torch.distributed.broadcast(parameter.data, src=0)
        self.teacher_optimizer = None
        self.teacher_lr_scheduler = None
        if self.online:
            self.add_callback(_TeacherOptimizerStep(self))
        self._forward_redirection = ForwardRedirection()

    @staticmethod
    def _dataset_formats(args: OKDConfig, kwargs: dict) -> tuple[tuple[str, ...], ...] | None:
        """SFTTrainer's accepted columns; None (no column check) when a formatting function or skipped preparation
        leaves the columns to the caller."""
        if kwargs.get("formatting_func") is not None or (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            return None
        text = args.dataset_text_field or "text"
        return tuple(columns if columns != ("text",) else (text,) for columns in SFT_FORMATS)

    @staticmethod
    def _online_module_config(args: OKDConfig):
        from peft import LoraConfig

        return LoraConfig(
            r=args.teacher_lora_r,
            lora_alpha=args.teacher_lora_alpha,
            lora_dropout=args.teacher_lora_dropout,
            target_modules=list(args.teacher_lora_target_modules),
            task_type="CAUSAL_LM",
        )

    @property
    def teacher_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The teacher's trainable (adapter) parameters, by name; empty when the teacher is frozen."""
        if not self.online:
            return []
        return [(name, p) for name, p in self.teacher_model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ optimizers
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        if self.online and self.teacher_optimizer is None:
            self.teacher_optimizer = self._create_teacher_optimizer()
        return optimizer

    def _create_teacher_optimizer(self) -> torch.optim.Optimizer:
        """The student's optimizer class and settings (weight decay, betas, ...) on the adapter, at its own LR."""
        decay_names = set(self.get_decay_parameter_names(self.teacher_model))
        named = self.teacher_parameters
        groups = [
            {"params": [p for n, p in named if n in decay_names], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay_names], "weight_decay": 0.0},
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.teacher_model)
        unsupported = {"params", "model", "optimizer_dict"} & optimizer_kwargs.keys()
        if unsupported:
            raise ValueError(
                f"optim={self.args.optim!r} builds its parameter groups from the model itself ({sorted(unsupported)}); "
                "OKDTrainer needs an optimizer that takes parameter groups for the teacher adapter (e.g. adamw_torch)."
            )
        learning_rate = self.args.teacher_learning_rate
        optimizer_kwargs["lr"] = self.args.learning_rate if learning_rate is None else learning_rate
        return optimizer_cls(groups, **optimizer_kwargs)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # Trainer drops its scheduler at each `train()` and builds a new one here: the teacher's follows it.
        rebuilt = self.lr_scheduler is None
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.online and (rebuilt or self.teacher_lr_scheduler is None):
            self.teacher_lr_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                optimizer=self.teacher_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(num_training_steps),
                num_training_steps=num_training_steps,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return scheduler

    def _step_teacher(self) -> None:
        """One optimizer step of the teacher adapter: average across processes, unscale (fp16), clip, step, zero."""
        params = [p for _, p in self.teacher_parameters if p.grad is not None]
        if self.accelerator.num_processes > 1:
            # The teacher is not DDP-wrapped; this is the mean DDP would take over the student's gradients.
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(self.accelerator.num_processes)
        scaler = self.accelerator.scaler
        if scaler is not None:
            scaler.unscale_(self.teacher_optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            params, self.args.max_grad_norm if self.args.max_grad_norm > 0 else float("inf")
        )
        if scaler is not None:
            scaler.step(self.teacher_optimizer)  # skipped on inf/nan; the student's optimizer step updates the scale
        else:
            self.teacher_optimizer.step()
        self.teacher_optimizer.zero_grad(set_to_none=True)
        self._metrics["train"]["teacher_grad_norm"].append(grad_norm.item())
        self._metrics["train"]["teacher_learning_rate"].append(self.teacher_lr_scheduler.get_last_lr()[0])

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "attention_mask" not in inputs:
            raise ValueError("OKDTrainer needs padded batches with an `attention_mask` (no padding-free collation).")
        mode = "train" if self.model.training else "eval"
        # Dropout of the online module is on while training it, like the student's.
        self.teacher_model.train(self.online and self.model.training)
        unwrapped = self.accelerator.unwrap_model(model)
        # Both backbones run inside the student wrapper's forward so DDP sees one forward pass. The explicit autocast
        # stands in for the one accelerate puts on `model.forward`, which the backbone calls go around.
        with self.accelerator.autocast():
            loss, stats = self._forward_redirection(
                model, unwrapped, self._okd_loss, unwrapped, inputs, num_items_in_batch
            )
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As SFTTrainer: `num_items_in_batch` counts every rank's tokens and DDP averages the gradients.
            loss = loss * self.accelerator.num_processes

        names = list(stats)
        values = self.accelerator.gather_for_metrics(torch.stack([stats[n] for n in names]).float().unsqueeze(0))
        for name, value in zip(names, values.mean(0).tolist()):
            self._metrics[mode][name].append(value)
        self._log_num_tokens(inputs, mode)
        loss = self._check_finite(loss, model, name="OKD loss")
        return (loss, None) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation reports the losses and metrics only: OKD never builds the full logits `compute_metrics` needs."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _loss_parameters(self) -> dict[str, Any]:
        return {"beta": self.args.beta, "alpha": self.args.skew_alpha, "mu": self.args.akl_mu}

    def _okd_loss(self, student, inputs, num_items_in_batch):
        """Student and teacher losses from the two backbones' hidden states, each chunked over completion rows.

        Each chunked call differentiates only its first ("student") side, so the student loss reaches the student and
        the teacher loss reaches the teacher adapter: their sum needs a single backward.
        """
        # Position t predicts token t+1: drop the last hidden state, compare against labels[1:].
        labels = inputs["labels"][:, 1:]
        student_hidden = backbone_hidden_states(student, inputs["input_ids"], inputs["attention_mask"])[:, :-1]
        with torch.set_grad_enabled(self.online and torch.is_grad_enabled()):
            teacher_hidden = backbone_hidden_states(
                self.teacher_model, inputs["input_ids"], inputs["attention_mask"]
            )[:, :-1]
        teacher_hidden = teacher_hidden.to(student_hidden.device)
        self._watch_terms({"student hidden states": student_hidden, "teacher hidden states": teacher_hidden})
        student_head, teacher_head = output_head(student), output_head(self.teacher_model)
        return self._as_heads_forward(  # gathers ZeRO-3 head shards
            student_head, teacher_head, self._head_losses,
            student_head, teacher_head, student_hidden, teacher_hidden, labels, num_items_in_batch,
        )

    def _head_losses(self, student_head, teacher_head, student_hidden, teacher_hidden, labels, num_items_in_batch):
        """`_okd_loss`'s losses and statistics from the two backbones' hidden states and the two output heads."""
        mask = labels != -100
        columns = self.vocab_columns  # heads padded past the shared tokenizer are compared on its columns only
        student_weight = student_head.weight[:columns]
        student_bias = None if student_head.bias is None else student_head.bias[:columns]
        teacher_weight = teacher_head.weight[:columns].to(student_hidden.device)
        teacher_bias = None if teacher_head.bias is None else teacher_head.bias[:columns].to(student_hidden.device)
        common = dict(
            mask=mask,
            labels=labels,
            temperature=self.args.loss_temperature,
            num_items=num_items_in_batch,
            chunk_size=self.args.loss_chunk_size,
            return_stats=True,
        )

        # L_S = D(p_teacher || q_student) (+ optional CE): the teacher side is a constant here.
        student_loss, student_stats = losses.chunked_divergence(
            self.args.loss_type,
            student_hidden,
            student_weight,
            teacher_hidden.detach(),
            teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            ce_weight=self.args.student_ce_weight,
            **common,
            **self._loss_parameters(),
        )
        self._watch_terms({f"student loss ({self.args.loss_type})": student_loss})
        num_tokens = student_stats["num_tokens"]
        # Stats are normalised like the loss (by `num_items_in_batch`, the whole accumulated batch): report them per
        # completion token of this micro-batch instead, which is what the logged averages should mean.
        denominator = num_tokens if num_items_in_batch is None else num_tokens.new_tensor(float(num_items_in_batch))
        per_token = denominator / num_tokens.clamp(min=1)
        stats = {
            "loss/student": student_stats["divergence"] * per_token,
            "loss/student_ce": student_stats["ce"] * per_token,
            "teacher_agreement": student_stats["agreement"],
        }
        loss = student_loss
        if self.online:
            # L_T = alpha * KL(q_student || p_teacher) + (1 - alpha) * CE(p_teacher, y): the roles swap, the teacher
            # is the differentiated side and the detached student the target, so forward_kl(target || trained) is
            # exactly KL(q_student || p_teacher).
            teacher_loss, teacher_stats = losses.chunked_divergence(
                "forward_kl",
                teacher_hidden,
                teacher_weight,
                student_hidden.detach(),
                student_weight.detach(),
                student_bias=teacher_bias,
                teacher_bias=None if student_bias is None else student_bias.detach(),
                divergence_weight=self.args.alpha,
                ce_weight=1.0 - self.args.alpha,
                **common,
            )
            self._watch_terms({"teacher loss (alpha * KL + (1 - alpha) * CE)": teacher_loss})
            loss = loss + teacher_loss.to(loss.device)
            stats["loss/teacher_kd"] = teacher_stats["divergence"] * per_token
            stats["loss/teacher_ce"] = teacher_stats["ce"] * per_token

        with torch.no_grad():
            stats["mean_token_accuracy"] = self._token_accuracy(student_hidden, student_weight, student_bias, labels)
            stats["teacher_token_accuracy"] = self._token_accuracy(teacher_hidden, teacher_weight, teacher_bias, labels)
        return loss, stats

    def _token_accuracy(self, hidden, weight, bias, labels) -> torch.Tensor:
        """Fraction of completion tokens whose argmax is the label, projecting `loss_chunk_size` rows at a time
        (the chunked losses do not report it, and the full logits must not be built)."""
        rows = (labels != -100).reshape(-1).nonzero().squeeze(1)
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        targets = labels.reshape(-1)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, rows.numel(), self.args.loss_chunk_size):
            chunk = rows[start : start + self.args.loss_chunk_size]
            predicted = F.linear(hidden[chunk], weight.detach(), None if bias is None else bias.detach()).argmax(-1)
            correct += (predicted == targets[chunk]).sum()
        return correct.float() / max(rows.numel(), 1)

    # ------------------------------------------------------------------ saving and resuming
    def _save_extra(self, output_dir: str) -> None:
        """Next to the student (saved as `SFTTrainer` does), the trained teacher adapter in `teacher_adapter/`."""
        if self.online:
            teacher = self.accelerator.unwrap_model(self.teacher_model)
            teacher.save_pretrained(os.path.join(output_dir, TEACHER_ADAPTER_DIR))

    def _extra_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(f"teacher {name}", p) for name, p in self.teacher_parameters]

    def _save_extra_state(self, output_dir: str) -> None:
        super()._save_extra_state(output_dir)
        if self.online and self.args.should_save:
            torch.save(self.teacher_optimizer.state_dict(), os.path.join(output_dir, TEACHER_OPTIMIZER_NAME))
            torch.save(self.teacher_lr_scheduler.state_dict(), os.path.join(output_dir, TEACHER_SCHEDULER_NAME))

    def _load_extra_state(self, checkpoint: str) -> None:
        super()._load_extra_state(checkpoint)
        if not self.online:
            return
        adapter_dir = os.path.join(checkpoint, TEACHER_ADAPTER_DIR)
        if not os.path.isdir(adapter_dir):
            raise FileNotFoundError(
                f"{checkpoint} has no {TEACHER_ADAPTER_DIR}/: it was not written by an online OKDTrainer."
            )
        from peft import load_peft_weights, set_peft_model_state_dict

        teacher = self.accelerator.unwrap_model(self.teacher_model)
        device = next(p.device for _, p in self.teacher_parameters)
        result = set_peft_model_state_dict(teacher, load_peft_weights(adapter_dir, device=str(device)))
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ValueError(f"{adapter_dir} does not match the teacher's online module; missing {missing[:3]} ...")

        optimizer_file = os.path.join(checkpoint, TEACHER_OPTIMIZER_NAME)
        scheduler_file = os.path.join(checkpoint, TEACHER_SCHEDULER_NAME)
        if not (os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)):
            return  # like Trainer: a checkpoint saved with `save_only_model` resumes with fresh optimizer states
        self.teacher_optimizer.load_state_dict(torch.load(optimizer_file, map_location=device, weights_only=True))
        self.teacher_lr_scheduler.load_state_dict(torch.load(scheduler_file, weights_only=True))
