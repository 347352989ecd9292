"""Numeric guards of every trl-distill trainer (`NonFiniteGuardMixin`, part of `DistillTrainerMixin`).

- `_check_finite(loss, model)`: a non-finite loss raises `FloatingPointError` naming the step and the first
  non-finite term (named with `_watch_terms`), or (with `on_nonfinite="skip"`) turns the batch into a zero-gradient
  no-op;
- `_get_grad_norm`: a NaN/inf gradient behind a finite loss (student or extra trainable parameters, checked before the
  optimizer step) raises naming the step and the parameters, or skips the optimizer step.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("trl_distill")

NONFINITE_POLICIES = ("raise", "skip")


class NonFiniteGuardMixin:
    """What a trainer does with a NaN/inf loss or gradient; see the module docstring."""

    def _watch_terms(self, terms: dict[str, torch.Tensor | None]) -> None:
        """Name the tensors a loss is built from, in computation order: inspected only if the loss is non-finite."""
        watched = self.__dict__.setdefault("_watched_terms", {})
        watched.update({name: tensor for name, tensor in terms.items() if tensor is not None})

    def _check_finite(self, loss: torch.Tensor, model: torch.nn.Module, name: str = "loss") -> torch.Tensor:
        """Return `loss` if finite (or not training); else raise or, with `on_nonfinite="skip"`, a zero loss.

        The error names the first watched term that is non-finite, else `name` (what the loss is)."""
        watched, self._watched_terms = self.__dict__.get("_watched_terms", {}), {}
        skipping = getattr(self.args, "on_nonfinite", "raise") == "skip"
        if not self.model.training:
            return loss
        finite = bool(torch.isfinite(loss.detach()).all())
        if skipping:
            self._metrics["train"]["nonfinite_skipped"].append(0.0 if finite else 1.0)
        if finite:
            return loss
        term = next((name for name, t in watched.items() if not torch.isfinite(t.detach().float()).all()), name)
        where = (
            f"{type(self).__name__}: non-finite {term} at step {self.state.global_step + 1} "
            f"(epoch {self.state.epoch or 0:.2f}, loss={loss.detach().float().item()})"
        )
        if not skipping:
            raise FloatingPointError(
                f"{where}. Set `on_nonfinite='skip'` to skip such batches; a lower learning rate, fp32/bf16 instead of "
                "fp16, or checking the batch's data usually removes the cause."
            )
        logger.warning(f"{where}: batch skipped (zero gradients).")
        # A zero that reaches every trainable parameter, so DDP's gradient hooks all fire and no rank waits.
        params = [p for p in model.parameters() if p.requires_grad] + self._extra_trainable_parameters()
        return sum(p.reshape(-1)[:1].sum() for p in params) * 0.0 if params else loss.detach() * 0.0

    def _get_grad_norm(self, model, grad_norm=None):
        """`Trainer`'s gradient norm (pre-clip), then a check that every gradient about to be stepped is finite.

        A finite loss can still give NaN/inf gradients (an overflow inside the backward pass). `Trainer` would step
        on them and turn every weight into NaN; here they raise or, with `on_nonfinite="skip"`, the optimizer step
        is dropped (gradients set to None, so no optimizer moves a parameter). Under fp16 the GradScaler already
        skips such steps and lowers its scale, so it is left to do that."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if self.accelerator.scaler is not None:
            return grad_norm
        skipping = getattr(self.args, "on_nonfinite", "raise") == "skip"
        student_finite = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)).all())
        extra_finite = True
        extra = self._extra_trainable_parameters()
        if extra:  # the same list on every process, so all of them reduce or none
            # extra parameters (OKD's teacher adapter) are not DDP-wrapped: agree across processes before acting
            grads = [p.grad for p in extra if p.grad is not None]
            extra_bad = torch.tensor(float(any(not torch.isfinite(g).all() for g in grads)),
                                     device=self.accelerator.device)
            extra_finite = self.accelerator.reduce(extra_bad, reduction="sum").item() == 0
        finite = student_finite and extra_finite
        if skipping:
            self._metrics["train"]["nonfinite_grad_skipped"].append(0.0 if finite else 1.0)
        if finite:
            return grad_norm
        named = list(model.named_parameters()) + self._extra_named_parameters()
        bad = [n for n, p in named if p.grad is not None and not torch.isfinite(p.grad).all()]
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        where = (
            f"{type(self).__name__}: non-finite gradient at step {self.state.global_step + 1} with a finite loss, in "
            f"{shown or 'the parameters of another process'}"
        )
        if not skipping:
            raise FloatingPointError(
                f"{where}. Set `on_nonfinite='skip'` to skip such optimizer steps; a lower learning rate or a smaller "
                "`max_grad_norm` usually removes the cause."
            )
        logger.warning(f"{where}: optimizer step skipped.")
        for _, p in named:
            p.grad = None
        return grad_norm

    def _extra_named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable parameters outside `model` (OKD's teacher adapter), with the names errors show; skipped batches
        and skipped optimizer steps cover them too."""
        return []

    def _extra_trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, p in self._extra_named_parameters()]
