"""ADPOTrainer: anchored listwise preference optimization ([ADPO](https://huggingface.co/papers/2510.18913)).

For a prompt with K completions the policy scores each one by its log-probability ratio to an *anchor*,
`s_i = (l_theta(y_i) - l_anchor(y_i)) / tau`, and is trained with a cross-entropy between a target distribution `q`
over the K completions and `softmax(s)`:

    L = - sum_i q_i log softmax(s)_i,   q = softmax(z / beta_r),   z = group z-score of the rewards.

With K = 2, a hard target (1, 0), a fixed anchor (the reference model) and `tau = 1 / beta` this is exactly TRL's
sigmoid DPO loss, so `DPOTrainer` -> `ADPOTrainer` (and `DPOConfig` -> `ADPOConfig`) is the only change a TRL DPO
script needs. The anchor can also follow the policy (`"ema"`, `"periodic"`) or be a teacher model (`"teacher"`, the
distillation setting; ours, the authors' code has none).

Data: TRL's pairwise preference format (`prompt`/`chosen`/`rejected`, hard target), or listwise rows with
`prompt`, `completions` (a list, any length per row) and `rewards` (one float per completion) -- or no `rewards`
column and `reward_funcs`: callables in TRL's GRPO reward convention (e.g. the functions of `trl.rewards`), called
once when the dataset is prepared, since the completions are fixed.

Authors' code: https://github.com/wk222/TRL-ADPO (a TRL fork). Everything here is written on top of TRL's
`DPOTrainer`: its model/PEFT/reference set-up, its tokenization of pairs and its fused log-prob head.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from accelerate.utils import is_peft_model
from datasets import Dataset, IterableDataset
from transformers import PreTrainedModel, TrainerCallback
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import use_adapter

from ._common import DistillArguments, DistillTrainerMixin, gathered_parameters
from ._dpo import completion_token_logps
from ._teacher import TeacherArguments, TeacherTrainerMixin
from ..teacher import backbone_hidden_states, disable_cpu_4bit_packing, output_head
from ..listwise import DataCollatorForListwisePreference, pad_token_id, prepare_listwise_dataset
from ..validation import PREFERENCE_FORMATS, validate_datasets

ANCHORS = ("fixed", "ema", "periodic", "teacher")
SCALE_REWARDS = ("group", "none")
# Added to the group standard deviation before dividing, as TRL's GRPO does, so a group whose rewards barely differ
# does not blow up into a one-hot target.
REWARD_STD_EPS = 1e-4
# Name of the frozen adapter holding the anchor of a PEFT policy. TRL's DPOTrainer uses the same name for its
# reference copy of a pretrained adapter, so the "fixed" anchor of such a model is TRL's own reference.
ANCHOR_ADAPTER = "ref"
# A moving anchor that is a whole model (not an adapter) is saved in each checkpoint under this name.
ANCHOR_WEIGHTS_NAME = "anchor.safetensors"

logger = logging.getLogger(__name__)


@dataclass
class ADPOConfig(TeacherArguments, DistillArguments, DPOConfig):
    r"""
    Configuration for [`ADPOTrainer`] ([ADPO](https://huggingface.co/papers/2510.18913)). Every field of TRL's
    `DPOConfig` keeps its meaning, except the DPO loss settings (`beta`, `loss_type`, ...), which ADPO does not use:
    its temperature is `tau`, and `tau = 1 / beta` reproduces sigmoid DPO on pairs.

    `overwrite_output_dir` and `on_nonfinite` are shared by every trl-distill config (see [`DistillArguments`]).

    Args:
        tau (`float`, *optional*, defaults to `1.0`):
            Temperature of the anchored scores `s_i = (l_theta(y_i) - l_anchor(y_i)) / tau`. Smaller values make the
            policy move less from the anchor for the same target (DPO's `beta = 1 / tau`).
        beta_r (`float`, *optional*, defaults to `0.5`):
            Temperature of the target `q = softmax(z / beta_r)` built from the rewards. Smaller is sharper.
        scale_rewards (`str`, *optional*, defaults to `"group"`):
            `"group"`: `z = (r - mean r) / (std r + 1e-4)` per prompt, as TRL's GRPO (unbiased std). `"none"`: only
            centred, `z = r - mean r`, so the reward scale sets the target's sharpness.
        length_normalize (`bool`, *optional*, defaults to `False`):
            Average the sequence log-probs per completion token instead of summing them. `False` is the authors' TRL
            code; `True` is their later port's default and what the paper's analysis assumes.
        anchor (`str`, *optional*, defaults to `"fixed"`):
            What `l_anchor` comes from: `"fixed"` the reference model (as DPO: `ref_model`, or the PEFT policy with its
            adapter disabled), `"ema"` an exponential moving average of the policy (of its adapter weights when the
            policy is PEFT), `"periodic"` a copy of the policy refreshed every `anchor_refresh_steps`, `"teacher"` the
            `teacher_model` passed to the trainer (the distillation setting).
        ema_decay (`float`, *optional*, defaults to `0.99`):
            With `anchor="ema"`, once per optimizer step `anchor <- ema_decay * anchor + (1 - ema_decay) * policy`.
        anchor_refresh_steps (`int`, *optional*, defaults to `100`):
            With `anchor="periodic"`, copy the policy into the anchor every this many optimizer steps.
        anchor_kl_coef (`float`, *optional*, defaults to `0.0`):
            Weight of a KL penalty to the anchor, the mean over completion tokens of the k3 estimate
            `exp(a - l) - (a - l) - 1` (`a`, `l` the anchor's and policy's token log-probs).
        reward_weights (`list[float]` or `None`, *optional*, defaults to `None`):
            Weights of the trainer's `reward_funcs` when they are summed (as TRL's GRPO); `None` weighs each by 1.
        anchor_chunk_size (`int`, *optional*, defaults to `1024`):
            With `anchor="teacher"`, the teacher's log-probs are computed from its hidden states, this many completion
            tokens at a time, over the shared vocabulary only (a head padded larger takes no mass), so its full
            logits never exist.

    With `anchor="teacher"`, the teacher fields (`teacher_model_name_or_path`, `teacher_model_revision`,
    `teacher_model_init_kwargs`, `teacher_quantization`, `teacher_adapter`) of every config with a teacher say which
    teacher anchors the scores and how it is loaded (see [`TeacherArguments`]); with another anchor they must be unset.
    """

    tau: float = field(default=1.0, metadata={"help": "Temperature of the anchored scores (DPO's beta = 1/tau)."})
    beta_r: float = field(default=0.5, metadata={"help": "Temperature of the reward target q = softmax(z / beta_r)."})
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "'group': z-score rewards per prompt (as GRPO); 'none': only centre them.",
            "choices": list(SCALE_REWARDS),
        },
    )
    length_normalize: bool = field(
        default=False, metadata={"help": "Average sequence log-probs per completion token instead of summing them."}
    )
    anchor: str = field(
        default="fixed",
        metadata={"help": "Anchor model: 'fixed', 'ema', 'periodic' or 'teacher'.", "choices": list(ANCHORS)},
    )
    ema_decay: float = field(default=0.99, metadata={"help": "EMA decay of the anchor (anchor='ema')."})
    anchor_refresh_steps: int = field(
        default=100, metadata={"help": "Optimizer steps between anchor refreshes (anchor='periodic')."}
    )
    anchor_kl_coef: float = field(default=0.0, metadata={"help": "Weight of the k3 KL estimate to the anchor."})
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the reward functions (default: 1 each)."}
    )
    anchor_chunk_size: int = field(
        default=1024, metadata={"help": "Completion rows projected to teacher logits at a time (anchor='teacher')."}
    )
    def __post_init__(self):
        # Our own fields first: the parents' checks (e.g. bf16 on a CPU machine) must not hide a wrong one of ours.
        if self.tau <= 0:
            raise ValueError(f"ADPOConfig.tau must be > 0, got {self.tau}.")
        if self.beta_r <= 0:
            raise ValueError(f"ADPOConfig.beta_r must be > 0, got {self.beta_r}.")
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"ADPOConfig.scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}.")
        if self.anchor not in ANCHORS:
            raise ValueError(f"ADPOConfig.anchor must be one of {ANCHORS}, got {self.anchor!r}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ADPOConfig.ema_decay must be in [0, 1), got {self.ema_decay}.")
        if self.anchor_refresh_steps < 1:
            raise ValueError(f"ADPOConfig.anchor_refresh_steps must be >= 1, got {self.anchor_refresh_steps}.")
        if self.anchor_chunk_size < 1:
            raise ValueError(f"ADPOConfig.anchor_chunk_size must be >= 1, got {self.anchor_chunk_size}.")
        if self.anchor_kl_coef < 0:
            raise ValueError(f"ADPOConfig.anchor_kl_coef must be >= 0, got {self.anchor_kl_coef}.")
        teacher_fields = ("teacher_model_name_or_path", "teacher_model_revision", "teacher_quantization",
                          "teacher_adapter", "teacher_model_init_kwargs")
        if self.anchor != "teacher" and any(getattr(self, name) for name in teacher_fields):
            raise ValueError(f"ADPOConfig.{' / '.join(teacher_fields)} only apply with anchor='teacher'.")
        super().__post_init__()
        _reject_unused_dpo_fields(self, "ADPOConfig", "ADPO's loss replaces DPO's (tau = 1/beta reproduces sigmoid DPO)")
        if self.sync_ref_model:
            raise ValueError("ADPOConfig.sync_ref_model is not used: set anchor='ema' or anchor='periodic' instead.")
        if self.precompute_ref_log_probs:
            # TRL precomputes pairs only; listwise rows and moving anchors need the anchor at training time.
            raise ValueError("ADPOConfig.precompute_ref_log_probs is not supported: the anchor runs at training time.")


def _reject_unused_dpo_fields(args: DPOConfig, config_name: str, reason: str) -> None:
    """Raise if a DPO loss setting that this trainer ignores was changed from its default, naming the field."""
    defaults = {"loss_type": ["sigmoid"], "loss_weights": None, "ld_alpha": None, "f_divergence_type": "reverse_kl",
                "label_smoothing": 0.0, "use_weighting": False}
    for name, default in defaults.items():
        if getattr(args, name) != default:
            raise ValueError(f"{config_name}.{name}={getattr(args, name)!r} is not used: {reason}.")


# ---------------------------------------------------------------------------------------------------- loss


def group_by_prompt(values: torch.Tensor, counts: torch.Tensor, fill: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter flat per-completion `values` `[N]` into `[B, K_max]` rows (row i holds its `counts[i]` values).

    Returns the grouped tensor (missing slots hold `fill`) and a bool mask of the real slots.
    """
    counts = counts.to(values.device)
    rows = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
    starts = torch.cumsum(counts, 0) - counts
    columns = torch.arange(len(values), device=values.device) - starts[rows]
    width = int(counts.max()) if len(counts) else 0
    grouped = values.new_full((len(counts), width), fill)
    grouped = grouped.index_put((rows, columns), values)
    valid = torch.zeros(len(counts), width, dtype=torch.bool, device=values.device)
    valid[rows, columns] = True
    return grouped, valid


def listwise_target(
    rewards: torch.Tensor,
    valid: torch.Tensor,
    hard_target: torch.Tensor | None = None,
    beta_r: float = 0.5,
    scale_rewards: str = "group",
) -> torch.Tensor:
    """ADPO's target `q` `[B, K]` from grouped `rewards` `[B, K]` (only `valid` slots count).

    `q = softmax(z / beta_r)` with `z` the reward z-score within the row (`scale_rewards="group"`, unbiased std plus
    1e-4, as TRL's GRPO) or the centred reward (`"none"`). Rows flagged in `hard_target` get a one-hot target on their
    best completion (spread evenly over ties). Padding slots get 0. A row with one completion gets q = 1.
    """
    rewards = rewards.float()
    count = valid.sum(dim=1, keepdim=True).clamp(min=1)
    mean = (rewards * valid).sum(dim=1, keepdim=True) / count
    centred = (rewards - mean) * valid
    if scale_rewards == "group":
        std = (centred.pow(2).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)).sqrt()
        z = centred / (std + REWARD_STD_EPS)
    elif scale_rewards == "none":
        z = centred
    else:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    q = torch.softmax((z / beta_r).masked_fill(~valid, -math.inf), dim=1)
    if hard_target is not None and hard_target.any():
        best = rewards.masked_fill(~valid, -math.inf)
        is_best = (best == best.max(dim=1, keepdim=True).values) & valid
        one_hot = is_best.float() / is_best.sum(dim=1, keepdim=True)
        q = torch.where(hard_target.to(q.device).unsqueeze(1), one_hot, q)
    return q.detach()


def listwise_loss(scores: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-prompt cross-entropy `-sum_i q_i log softmax(s)_i` over the `valid` slots of `[B, K]` rows."""
    log_probs = torch.log_softmax(scores.masked_fill(~valid, -math.inf), dim=1)
    # Padding slots have q = 0 and log-prob -inf; zero them first so 0 * -inf does not turn into NaN.
    return -(target * log_probs.masked_fill(~valid, 0.0)).sum(dim=1)


def _teacher_token_logps(teacher, model_kwargs: dict, labels: torch.Tensor, columns: int, chunk_size: int) -> torch.Tensor:
    """Teacher log-probs `[N, T-1]` of the label tokens (0 where the label is -100), from its hidden states.

    Only the completion rows are projected, `chunk_size` at a time, and normalised over the first `columns` logits
    (the shared vocabulary), so a teacher head padded larger takes no probability mass and the full `[N, T, V]`
    logits never exist. Runs on the backbone, so a teacher with a (frozen) PEFT adapter works as it is.
    """
    hidden = backbone_hidden_states(teacher, model_kwargs["input_ids"], model_kwargs["attention_mask"])[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    head = output_head(teacher)
    rows, row_targets = hidden[mask], targets[mask]
    picked = []
    for start in range(0, rows.shape[0], chunk_size):
        logits = head(rows[start : start + chunk_size].to(head.weight.dtype))[:, :columns].float()
        picked.append(logits.log_softmax(-1).gather(-1, row_targets[start : start + chunk_size, None]).squeeze(-1))
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    if picked:
        out[mask] = torch.cat(picked)
    return out


class _AnchorUpdateCallback(TrainerCallback):
    """Moves the EMA / periodic anchor once per optimizer step (after the optimizer has stepped)."""

    def __init__(self, trainer: ADPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.update_anchor(state.global_step)


# ---------------------------------------------------------------------------------------------------- trainer


class ADPOTrainer(TeacherTrainerMixin, DistillTrainerMixin, DPOTrainer):
    """TRL's [`DPOTrainer`] with ADPO's anchored listwise loss ([ADPO](https://huggingface.co/papers/2510.18913)).

    Args are those of `DPOTrainer`, plus:
        teacher_model (`PreTrainedModel`, `str` or `None`): the anchor when `args.anchor == "teacher"`; a model, a path
            or a Hub id (default: `args.teacher_model_name_or_path`), loaded through
            [`trl_distill.teacher.load_teacher`] (4-bit / frozen adapter on request). It must share the student's
            vocabulary (a head padded larger is fine).
        reward_funcs (callable or list of callables, *optional*): functions in TRL's GRPO reward convention that score
            the `completions` of a listwise dataset that has no `rewards` column. They run once, when the dataset is
            prepared, and get `prompts`, `completions`, `completion_ids` and every other column as keyword arguments.

    The anchor: `"fixed"` is DPO's reference (`ref_model`, or the PEFT policy with its adapter disabled; an in-memory
    model without `ref_model` is deep-copied rather than reloaded); `"ema"`/`"periodic"` start as a copy of the policy
    (for a PEFT policy, a frozen copy of its adapter) and follow it after every optimizer step; `"teacher"` is
    `teacher_model`.

    Logged metrics (train and eval): `adpo/loss` (listwise cross-entropy), `adpo/accuracy` (fraction of prompts whose
    highest score is on a best-rewarded completion), `adpo/logratio` (mean `l_theta - l_anchor`), `adpo/target_entropy`,
    `anchor_kl` (k3 estimate, always logged), `logps/completions`, `entropy`, `num_tokens`.
    """

    _tag_names = ["trl", "trl-distill", "adpo"]
    _name = "ADPO"
    _paper = {
        "title": "ADPO: Anchored Direct Preference Optimization",
        "id": "2510.18913",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{wang2025adpo,
                title        = {{ADPO: Anchored Direct Preference Optimization}},
                author       = {Zixian Wang},
                year         = 2025,
                journal      = {arXiv preprint arXiv:2510.18913},
            }"""),
    }

    def __init__(
        self,
        model: str | PreTrainedModel,
        ref_model: PreTrainedModel | None = None,
        args: ADPOConfig | None = None,
        data_collator=None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        teacher_model: PreTrainedModel | str | None = None,
        reward_funcs: Callable | Sequence[Callable] | None = None,
    ):
        self._require_config(args, ADPOConfig)

        # Set before DPOTrainer.__init__, which calls `_prepare_dataset` (where the rewards are computed).
        self._set_reward_funcs(reward_funcs, args)
        # Pairs (DPO's columns), listwise rows with their rewards, listwise rows scored by `reward_funcs`, or
        # already tokenized listwise rows.
        listwise = [("prompt", "completions", "rewards"), ("prompt_ids", "completion_ids")]
        if self.reward_funcs:
            listwise = [("prompt", "completions"), *listwise]
        validate_datasets(
            "ADPOTrainer",
            processing_class,
            train_dataset,
            eval_dataset,
            formats=(*PREFERENCE_FORMATS, *listwise),
            hint="Listwise rows without a `rewards` column need `reward_funcs` to score their `completions`.",
        )
        ref_model = self._anchor_model(model, ref_model, teacher_model, args, processing_class, peft_config)
        if data_collator is None:
            data_collator = DataCollatorForListwisePreference(
                pad_token_id=pad_token_id(processing_class),
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                pad_to_multiple_of=args.pad_to_multiple_of,
            )
        super().__init__(
            model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config, peft_config=peft_config,
        )
        disable_cpu_4bit_packing(self.model)  # a QLoRA policy on CPU would lose its gradients after no-grad passes
        self._set_up_anchor(args)

    def _set_reward_funcs(self, reward_funcs, args: ADPOConfig) -> None:
        if reward_funcs is None:
            reward_funcs = []
        elif callable(reward_funcs):
            reward_funcs = [reward_funcs]
        self.reward_funcs = list(reward_funcs)
        if args.reward_weights is not None and len(args.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"ADPOConfig.reward_weights has {len(args.reward_weights)} weights for {len(self.reward_funcs)} reward functions."
            )
        self.reward_weights = list(args.reward_weights or [1.0] * len(self.reward_funcs))

    def _anchor_model(self, model, ref_model, teacher_model, args: ADPOConfig, processing_class, peft_config):
        """The model handed to DPOTrainer as `ref_model`: the loaded teacher (anchor="teacher"), the given reference,
        a copy of an in-memory policy, or None (a PEFT policy, or DPOTrainer reloads the policy's path)."""
        if args.anchor == "teacher":
            if ref_model is not None:
                raise ValueError("With anchor='teacher' the teacher is the anchor: pass `teacher_model`, not `ref_model`.")
            # DPOTrainer then handles the teacher as it handles any reference: frozen, dropout off, fused log-prob
            # head, placed by accelerate; and it creates no copy of the policy.
            return self._load_teacher(teacher_model, args, processing_class)
        if teacher_model is not None:
            raise ValueError(f"`teacher_model` is only used with anchor='teacher' (ADPOConfig.anchor={args.anchor!r}).")
        if ref_model is None and isinstance(model, PreTrainedModel) and peft_config is None and not is_peft_model(model):
            # DPOTrainer would reload the reference from `config._name_or_path`, which an in-memory model may not
            # have (or which may hold other weights than the ones passed in); a copy is the same policy at step 0.
            return copy.deepcopy(model)
        return ref_model

    def _set_up_anchor(self, args: ADPOConfig) -> None:
        """After DPOTrainer's set-up: the teacher anchor's vocabulary checks, or the moving anchor's adapter/callback."""
        self.teacher_vocab_columns = None
        if args.anchor == "teacher":
            self._prepare_teacher(self.ref_model, placement=None)  # TRL placed it as `ref_model`
            self.teacher_vocab_columns = self.vocab_columns
        if args.anchor in ("ema", "periodic"):
            if is_peft_model(self.model):
                self._add_anchor_adapter()
            self.add_callback(_AnchorUpdateCallback(self))

    # ------------------------------------------------------------------ anchor
    def _add_anchor_adapter(self) -> None:
        """Give a PEFT policy a frozen copy of its adapter to serve as the moving anchor (unless TRL made one)."""
        model = self.accelerator.unwrap_model(self.model)
        if ANCHOR_ADAPTER not in model.peft_config:
            model.add_adapter(ANCHOR_ADAPTER, model.peft_config["default"])
            model.set_adapter("default")  # add_adapter must not change which adapter trains
        parameters = dict(model.named_parameters())
        for name, parameter in parameters.items():
            if f".{ANCHOR_ADAPTER}." in name:
                parameter.requires_grad_(False)
                parameter.data.copy_(parameters[name.replace(f".{ANCHOR_ADAPTER}.", ".default.")].data)

    @torch.no_grad()
    def update_anchor(self, global_step: int) -> None:
        """One anchor update after optimizer step `global_step`: EMA, or a copy every `anchor_refresh_steps`."""
        if self.args.anchor == "ema":
            weight = 1.0 - self.args.ema_decay  # anchor <- decay * anchor + (1 - decay) * policy
        elif self.args.anchor == "periodic" and global_step % self.args.anchor_refresh_steps == 0:
            weight = 1.0
        else:
            return
        policy = self.accelerator.unwrap_model(self.model)
        if is_peft_model(policy):
            parameters = dict(policy.named_parameters())
            for name, anchor_parameter in parameters.items():
                if f".{ANCHOR_ADAPTER}." in name:
                    source = parameters[name.replace(f".{ANCHOR_ADAPTER}.", ".default.")]
                    anchor_parameter.data.mul_(1.0 - weight).add_(source.data, alpha=weight)
        else:
            # TRL's own mix-up (ZeRO-3 aware): target <- (1 - alpha) * target + alpha * policy.
            SyncRefModelCallback.sync_target_model(policy, self.accelerator.unwrap_model(self.ref_model), weight)

    # ------------------------------------------------------------------ checkpoints
    def _has_moving_anchor_model(self) -> bool:
        """An EMA/periodic anchor held as a separate model; a PEFT policy's anchor adapter is saved with the policy."""
        return self.args.anchor in ("ema", "periodic") and self.ref_model is not None

    def _save_extra_state(self, output_dir: str) -> None:
        super()._save_extra_state(output_dir)
        if self._has_moving_anchor_model():
            from safetensors.torch import save_model

            anchor = self.accelerator.unwrap_model(self.ref_model)
            with gathered_parameters(list(anchor.parameters())):  # whole weights under ZeRO-3 (every process enters)
                if self.args.should_save:
                    save_model(anchor, os.path.join(output_dir, ANCHOR_WEIGHTS_NAME))

    def _load_extra_state(self, checkpoint: str) -> None:
        super()._load_extra_state(checkpoint)
        if not self._has_moving_anchor_model():
            return
        path = os.path.join(checkpoint, ANCHOR_WEIGHTS_NAME)
        if not os.path.isfile(path):  # e.g. `save_only_model`: like the optimizer, the anchor then starts over
            logger.warning(
                f"{checkpoint} has no {ANCHOR_WEIGHTS_NAME}: the {self.args.anchor} anchor restarts from "
                "the policy as it was at construction."
            )
            return
        from safetensors.torch import load_model

        anchor = self.accelerator.unwrap_model(self.ref_model)
        # under ZeRO-3: load into the whole weights; process 0's values are sharded back out to every process
        with gathered_parameters(list(anchor.parameters()), modifier_rank=0):
            load_model(anchor, path, device=str(next(anchor.parameters()).device))

    def _anchor_token_logps(self, model_kwargs: dict, labels: torch.Tensor, seq_len: int) -> torch.Tensor:
        """Per-token log-probs `[N, seq_len]` of the completion tokens under the anchor (0 elsewhere), no grad."""
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None:
                # PEFT policy: the anchor is its frozen adapter copy if there is one, else the adapters disabled.
                policy = self.accelerator.unwrap_model(self.model)
                adapter = ANCHOR_ADAPTER if ANCHOR_ADAPTER in policy.peft_config else None
                with use_adapter(policy, adapter_name=adapter):
                    return self.model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]
            if self.teacher_vocab_columns is not None:
                return _teacher_token_logps(
                    self.ref_model, model_kwargs, labels, self.teacher_vocab_columns, self.args.anchor_chunk_size
                )[:, -seq_len:]
            return self.ref_model(**model_kwargs, labels=labels, fused_lm_head=True).log_probs[:, -seq_len:]

    # ------------------------------------------------------------------ data
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if "completions" not in next(iter(dataset)):
            if self.reward_funcs:
                raise ValueError(
                    "`reward_funcs` score listwise data: the dataset needs a `completions` column (a list per prompt)."
                )
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return prepare_listwise_dataset(
            dataset, processing_class, args, dataset_name, self.reward_funcs, self.reward_weights,
            self._tokenizer.eos_token,
        )

    def _count_step_tokens(self, batch_samples):
        if not self.args.anchor_kl_coef:
            return None
        return {"completions": sum(batch["completion_mask"][:, 1:].sum() for batch in batch_samples)}

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "completion_ids", "rewards"]

    # ------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        outputs, token_logps, shift_mask, model_kwargs, labels = completion_token_logps(model, inputs)
        seq_len = shift_mask.size(1)
        anchor_token_logps = self._anchor_token_logps(model_kwargs, labels, seq_len)

        lengths = shift_mask.sum(dim=1).clamp(min=1)
        logps, anchor_logps = token_logps.sum(dim=1), anchor_token_logps.sum(dim=1)
        if self.args.length_normalize:
            logps, anchor_logps = logps / lengths, anchor_logps / lengths
        logratios = logps - anchor_logps

        counts = inputs["completion_counts"]
        scores, valid = group_by_prompt(logratios / self.args.tau, counts)
        rewards, _ = group_by_prompt(inputs["rewards"].to(scores.device), counts)
        target = listwise_target(rewards, valid, inputs["hard_target"], self.args.beta_r, self.args.scale_rewards)
        listwise = listwise_loss(scores, target, valid).mean()

        # k3 estimate of KL(policy || anchor) per completion token: exp(a - l) - (a - l) - 1 >= 0.
        diff = (anchor_token_logps - token_logps) * shift_mask
        token_count = shift_mask.sum().clamp(min=1)
        anchor_kl_total = ((torch.exp(diff) - diff - 1) * shift_mask).sum()
        anchor_kl = anchor_kl_total / token_count  # logged: this micro-batch's mean
        loss = listwise
        if self.args.anchor_kl_coef:  # trained: its share of the mean over the whole step's completion tokens
            loss = loss + self.args.anchor_kl_coef * self._token_mean(anchor_kl_total, "completions", token_count)
        self._watch_terms({"policy log-probs": logps, "anchor log-probs": anchor_logps, "listwise loss": listwise,
                           "anchor_kl": anchor_kl})

        with torch.no_grad():
            best = (target == target.max(dim=1, keepdim=True).values) & valid
            picked = scores.detach().masked_fill(~valid, -math.inf).argmax(dim=1, keepdim=True)
            means = {
                "adpo/loss": listwise,
                "adpo/accuracy": best.gather(1, picked).float(),
                "adpo/logratio": logratios,
                "adpo/target_entropy": -(target * target.clamp(min=1e-12).log()).sum(dim=1),
                "anchor_kl": anchor_kl,
                "logps/completions": logps,
            }
            for name, value in means.items():
                self._metrics[mode][name].append(self._gather(value).mean().item())
            tokens = self._gather(shift_mask.sum()).sum().clamp(min=1)
            entropy = (outputs.entropy[:, -seq_len:] * shift_mask).sum()
            self._metrics[mode]["entropy"].append((self._gather(entropy).sum() / tokens).item())
            self._log_num_tokens(inputs, mode)

        if return_outputs:
            with torch.no_grad():  # as TRL: the fused head builds no logits, so rebuild them for `compute_metrics`
                outputs = model(**model_kwargs)
        loss = self._check_finite(loss, model, name="ADPO loss")
        return (loss, outputs) if return_outputs else loss

    def _card_teacher(self):
        return self.ref_model if self.args.anchor == "teacher" else None

    def _gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """A metric's values from every process, flat and in float32."""
        return self.accelerator.gather_for_metrics(tensor.detach().float().reshape(-1))
