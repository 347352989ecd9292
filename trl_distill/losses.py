"""Token-level distillation divergences, dense and chunked.

Every loss compares the teacher distribution ``p = softmax(teacher_logits / T)`` with the student distribution
``q = softmax(student_logits / T)`` at each position, then reduces: the per-position divergences of the counted
positions (``mask`` True; all positions without a mask) are summed and divided by ``num_items`` when given (the
number of completion tokens in the whole gradient-accumulated batch, as TRL's ``num_items_in_batch``), else by the
number of counted positions (at least 1).

The module has three layers, and the math lives in exactly one of them:

1. per-position functions (``_forward_kl_per_position`` ...) map two log-distributions ``[..., D]`` to the
   divergence per position ``[...]`` and its closed-form gradient w.r.t. the student log-probs;
2. ``_log_distributions`` turns logits (or a :class:`TopKTeacher`) into those log-distributions: the full
   vocabulary (``D = V``) or the teacher's top-k tokens plus one "rest" bucket (``D = k + 1``);
3. two drivers reduce them: :func:`divergence` (and one public function per loss) on logits, and
   :func:`chunked_divergence` on hidden states, which never holds more than ``chunk_size`` rows of logits.

The teacher side is always treated as a constant. Math runs in float32 at least (float64 stays float64).
Gradients are first order only (no double backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_rkl", "tvd", "akl")

# The one hyper-parameter each loss takes (losses not listed take none).
_PARAMETER_OF = {"jsd": "beta", "skew_kl": "alpha", "skew_rkl": "alpha", "akl": "mu"}


@dataclass(frozen=True)
class TopKTeacher:
    """Sparse (e.g. stored/offline) teacher: the teacher's k most likely token ids and their log-probs
    (log-probs already at the loss temperature: the student side alone is divided by `temperature`).

    :func:`teacher_topk` builds one from dense logits, sorted by descending log-prob, with `rest_logprobs`: the log
    of the mass outside the k tokens, computed by log-sum-exp over the other tokens. Without it the rest is taken as
    ``1 - sum(exp(logprobs))``, which cancels in float32 when the rest is below ~1e-6 (the rest bucket is then
    floored at the dtype's epsilon). Storing one costs ``k`` ids, ``k`` log-probs and one rest log-prob per token
    instead of ``V`` logits.
    """

    ids: Tensor  # [..., k] long
    logprobs: Tensor  # [..., k] float
    rest_logprobs: Tensor | None = None  # [...] float: log(1 - sum of the k probabilities), computed stably

    def __post_init__(self):
        if self.ids.shape != self.logprobs.shape:
            raise ValueError(
                f"TopKTeacher.ids and TopKTeacher.logprobs must have the same shape, got "
                f"{tuple(self.ids.shape)} and {tuple(self.logprobs.shape)}"
            )
        if self.ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"TopKTeacher.ids must be an integer tensor, got {self.ids.dtype}")
        if self.rest_logprobs is not None and self.rest_logprobs.shape != self.ids.shape[:-1]:
            raise ValueError(
                f"TopKTeacher.rest_logprobs must have the leading shape of ids, {tuple(self.ids.shape[:-1])}, "
                f"got {tuple(self.rest_logprobs.shape)}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def select(self, index) -> "TopKTeacher":
        """The entries at `index` of the leading dimensions (a mask, a slice or an index tensor)."""
        rest = None if self.rest_logprobs is None else self.rest_logprobs[index]
        return TopKTeacher(self.ids[index], self.logprobs[index], rest)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------

_RANGES = {  # name -> (low, high, low_inclusive, high_inclusive)
    "beta": (0.0, 1.0, True, True),
    "alpha": (0.0, 1.0, True, False),
    "mu": (0.0, 1.0, False, True),
}


def _check_parameter(name: str, value: float) -> None:
    low, high, low_in, high_in = _RANGES[name]
    above = value >= low if low_in else value > low
    below = value <= high if high_in else value < high
    if not (above and below):  # also rejects NaN
        interval = f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"
        raise ValueError(f"{name} must be in {interval}, got {value}")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_top_k(teacher_top_k: int | None, name: str = "teacher_top_k") -> None:
    if teacher_top_k is not None and (isinstance(teacher_top_k, bool) or int(teacher_top_k) != teacher_top_k
                                      or teacher_top_k < 1):
        raise ValueError(f"{name} must be an integer >= 1 (or None), got {teacher_top_k}")


def _check_loss_type(loss_type: str) -> None:
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_vocab(student_size: int, teacher_size: int) -> None:
    if student_size != teacher_size:
        raise ValueError(
            f"student vocabulary size ({student_size}) != teacher vocabulary size ({teacher_size}); "
            "slice a padded output head to the shared vocabulary first"
        )


def _check_lead_shape(name: str, shape: torch.Size, expected: torch.Size) -> None:
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name} has leading shape {tuple(shape)}, expected {tuple(expected)}")


# ---------------------------------------------------------------------------------------------------------------
# Log-distributions: dense vocabulary or teacher top-k + rest bucket
# ---------------------------------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half precision (softmax and log-ratios lose too much in 16 bits), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """[..., V] logits -> [..., V] log-probs at `temperature`, in float32 or wider."""
    logits = logits.to(_compute_dtype(logits.dtype))
    if temperature != 1.0:
        logits = logits / temperature
    return F.log_softmax(logits, dim=-1)


def _finite(teacher_logprobs: Tensor, in_place: bool = False) -> Tensor:
    """Floor teacher log-probs at the most negative finite float.

    A masked (``-inf``) teacher logit would give ``0 * (-inf) = NaN`` in ``p * (log p - log q)``; floored, the token
    keeps exactly zero mass (``exp`` underflows to 0) and every term stays finite. The teacher side carries no
    gradient, so this is one pass (in place on a fresh tensor); the student's logits come from a linear head and are
    finite.
    """
    floor = torch.finfo(teacher_logprobs.dtype).min
    return teacher_logprobs.clamp_(min=floor) if in_place else teacher_logprobs.clamp(min=floor)


def _log_rest(logprobs: Tensor, ids: Tensor) -> Tensor:
    """[..., V] log-probs and [..., k] distinct ids -> [..., 1] log of the mass outside those ids, computed stably.

    Log-sum-exp over the other tokens: ``log(1 - sum(exp(...)))`` cancels when the k tokens hold almost all the mass
    (in float32 a rest below ~1e-6 is lost in the rounding of the sum, which made a confident student's loss and
    gradient wrong). Gradients flow into the tokens outside `ids` only. With k >= V nothing is outside: the rest is
    empty and set to the dtype's epsilon on both sides (equal there, so it adds exactly nothing to any divergence).
    The ids are overwritten with (and -inf entries floored at) the most negative finite float, not -inf: a row whose
    outside tokens all have zero mass then gets a zero-mass rest and a zero gradient instead of -inf and NaN.
    """
    if ids.shape[-1] >= logprobs.shape[-1]:
        return logprobs.new_full((*logprobs.shape[:-1], 1), math.log(torch.finfo(logprobs.dtype).eps))
    floor = torch.finfo(logprobs.dtype).min
    outside = logprobs.scatter(-1, ids.long(), floor).clamp_(min=floor)
    return torch.logsumexp(outside, dim=-1, keepdim=True)


def _log_rest_from_sum(logprobs_on_ids: Tensor) -> Tensor:
    """[..., k] log-probs -> [..., 1] ``log(1 - sum)``, for a stored teacher without its rest: floored at the dtype's
    epsilon (no ``log 0``); loses precision when the rest is below ~1e-6 in float32 (see :func:`_log_rest`)."""
    floor = torch.finfo(logprobs_on_ids.dtype).eps
    return (1.0 - logprobs_on_ids.exp().sum(dim=-1, keepdim=True)).clamp(min=floor).log()


def _top_k_of(teacher: TopKTeacher, top_k: int | None) -> TopKTeacher:
    """Keep the `top_k` most likely of a stored teacher's entries (all of them when `top_k` is None); the dropped
    entries' mass joins the rest."""
    if top_k is None or top_k == teacher.k:
        return teacher
    if top_k > teacher.k:
        raise ValueError(f"teacher_top_k ({top_k}) exceeds the k={teacher.k} entries the TopKTeacher holds")
    order = teacher.logprobs.argsort(dim=-1, descending=True)  # does not rely on the stored order
    kept, dropped = order[..., :top_k], order[..., top_k:]
    rest = None
    if teacher.rest_logprobs is not None:
        dropped_mass = torch.logsumexp(teacher.logprobs.gather(-1, dropped), dim=-1)
        rest = torch.logaddexp(teacher.rest_logprobs.to(dropped_mass.dtype), dropped_mass)
    return TopKTeacher(ids=teacher.ids.gather(-1, kept), logprobs=teacher.logprobs.gather(-1, kept),
                       rest_logprobs=rest)


def _log_distributions(
    student_logits: Tensor, teacher: Tensor | TopKTeacher, temperature: float, top_k: int | None
) -> tuple[Tensor, Tensor]:
    """Student logits and a teacher -> (student_logprobs, teacher_logprobs), the two distributions to compare.

    Args:
        student_logits: [..., V]
        teacher: [..., V] logits, or a TopKTeacher with [..., k] ids and log-probs (already at the temperature)
        temperature: divides both sides' logits
        top_k: keep only the teacher's top-k tokens plus a rest bucket (None: full vocabulary)

    Returns:
        Two [..., D] log-distributions, D = V (dense) or k + 1 (top-k + rest). The teacher's is detached.
    """
    student_logprobs = _log_softmax(student_logits, temperature)
    if isinstance(teacher, TopKTeacher):
        teacher = _top_k_of(teacher, top_k)
    else:
        teacher_logprobs = _finite(_log_softmax(teacher.detach(), temperature), in_place=True)  # a fresh tensor
        if top_k is None:
            return student_logprobs, teacher_logprobs
        logprobs, ids = teacher_logprobs.topk(min(top_k, teacher_logprobs.shape[-1]), dim=-1)
        teacher = TopKTeacher(ids=ids, logprobs=logprobs, rest_logprobs=_log_rest(teacher_logprobs, ids)[..., 0])
    ids = teacher.ids.long()
    student_on_ids = student_logprobs.gather(-1, ids)
    student_rest = _log_rest(student_logprobs, ids)
    teacher_on_ids = _finite(teacher.logprobs.detach().to(student_logprobs.dtype))
    if teacher.rest_logprobs is None:
        teacher_rest = _log_rest_from_sum(teacher_on_ids)
    else:
        teacher_rest = _finite(teacher.rest_logprobs.detach().to(student_logprobs.dtype)).unsqueeze(-1)
    return torch.cat([student_on_ids, student_rest], dim=-1), torch.cat([teacher_on_ids, teacher_rest], dim=-1)


def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> TopKTeacher:
    """Dense teacher logits -> its k most likely tokens and their log-probs at `temperature` (a stored teacher).

    Args:
        teacher_logits: [..., V]
        k: number of tokens to keep (k >= V keeps the whole vocabulary)
        temperature: the loss temperature the log-probs are taken at

    Returns:
        TopKTeacher with [..., k] long ids and float32 (or float64) log-probs, sorted by descending log-prob, and the
        [...] log-mass outside them (``rest_logprobs``, log-sum-exp of the other tokens), detached.
    """
    _check_top_k(k, "k")
    _check_temperature(temperature)
    logprobs = _finite(_log_softmax(teacher_logits.detach(), temperature), in_place=True)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    return TopKTeacher(ids=ids, logprobs=values, rest_logprobs=_log_rest(logprobs, ids)[..., 0])


# ---------------------------------------------------------------------------------------------------------------
# Per-position divergences: [..., D] student and teacher log-distributions -> [...] values and [..., D] gradients
# ---------------------------------------------------------------------------------------------------------------
# Each function returns the divergence per position and, when asked, its gradient w.r.t. the student log-probs
# s = log q, taken entry by entry (autograd then carries it through log_softmax, top-k gather and rest bucket). The
# closed forms cost a few passes over [..., D] where autograd through the value would take about three times as many
# and keep more [..., D] tensors alive. Log-probs are finite (log_softmax of finite student logits; _finite on the
# teacher; the floored rest bucket), so a zero-mass entry has exp() exactly 0 and its 0 * (finite) term vanishes.


def _kl(from_logprobs: Tensor, to_logprobs: Tensor) -> Tensor:
    """KL(a || b) = sum a * (log a - log b) over the last dim. [..., D], [..., D] -> [...]"""
    return (from_logprobs.exp() * (from_logprobs - to_logprobs)).sum(dim=-1)


def _log_mixture(first_logprobs: Tensor, second_logprobs: Tensor, first_weight: float) -> Tensor:
    """log(w * a + (1 - w) * b), computed in log space so tiny probabilities keep their precision. [..., D]

    Where a == b the mixture is a itself; taking it as is (logaddexp would round it by an ulp) keeps the divergences
    exactly 0 when p == q.
    """
    if first_weight == 0.0:
        return second_logprobs
    if first_weight == 1.0:
        return first_logprobs
    mixture = torch.logaddexp(first_logprobs + math.log(first_weight), second_logprobs + math.log1p(-first_weight))
    return torch.where(first_logprobs == second_logprobs, first_logprobs, mixture)


def _forward_kl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool):
    """KL(p || q): mean-seeking, the student covers all the teacher's mass (Hinton et al. 2015).
    d/ds = -p."""
    teacher_probs = teacher_logprobs.exp()
    value = (teacher_probs * (teacher_logprobs - student_logprobs)).sum(dim=-1)
    return value, (-teacher_probs if with_grad else None)


def _reverse_kl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool):
    """KL(q || p): mode-seeking, the student avoids putting mass where the teacher has little (MiniLLM).
    d/ds = q * (s - t + 1)."""
    student_probs = student_logprobs.exp()
    log_ratio = student_logprobs - teacher_logprobs
    value = (student_probs * log_ratio).sum(dim=-1)
    return value, (student_probs * (log_ratio + 1) if with_grad else None)


def _jsd_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool, beta: float):
    """beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta * p + (1 - beta) * q (GKD, TRL's convention).

    The formula tends to 0 at both ends; like TRL we define beta = 0 as forward KL and beta = 1 as reverse KL.
    d/ds = (1 - beta) * q * (s - log m): the terms through m cancel because m is a mixture.
    """
    if beta == 0.0:
        return _forward_kl_per_position(student_logprobs, teacher_logprobs, with_grad)
    if beta == 1.0:
        return _reverse_kl_per_position(student_logprobs, teacher_logprobs, with_grad)
    mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, beta)
    student_probs = student_logprobs.exp()
    student_log_ratio = student_logprobs - mixture_logprobs
    value = (beta * _kl(teacher_logprobs, mixture_logprobs)
             + (1 - beta) * (student_probs * student_log_ratio).sum(dim=-1))
    return value, ((1 - beta) * student_probs * student_log_ratio if with_grad else None)


def _skew_kl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool, alpha: float):
    """KL(p || alpha * p + (1 - alpha) * q) (DistiLLM): mixing some p into q bounds the log-ratio by -log(alpha).
    d/ds = -(1 - alpha) * p * q / m."""
    mixture_logprobs = _log_mixture(teacher_logprobs, student_logprobs, alpha)
    value = _kl(teacher_logprobs, mixture_logprobs)
    if not with_grad:
        return value, None
    return value, -(1 - alpha) * (teacher_logprobs + student_logprobs - mixture_logprobs).exp()


def _skew_rkl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool, alpha: float):
    """KL(q || alpha * q + (1 - alpha) * p) (DistiLLM), the skewed reverse KL.
    d/ds = q * (s - log m + 1 - alpha * q / m)."""
    mixture_logprobs = _log_mixture(student_logprobs, teacher_logprobs, alpha)
    student_probs = student_logprobs.exp()
    log_ratio = student_logprobs - mixture_logprobs
    value = (student_probs * log_ratio).sum(dim=-1)
    if not with_grad:
        return value, None
    return value, student_probs * (log_ratio + 1 - alpha * log_ratio.exp())


def _tvd_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool):
    """0.5 * sum |p - q|, the total variation distance (bounded in [0, 1]).
    d/ds = 0.5 * sign(q - p) * q (0 where q == p)."""
    student_probs = student_logprobs.exp()
    difference = student_probs - teacher_logprobs.exp()
    value = 0.5 * difference.abs().sum(dim=-1)
    return value, (0.5 * difference.sign() * student_probs if with_grad else None)


def _akl_per_position(student_logprobs: Tensor, teacher_logprobs: Tensor, with_grad: bool, mu: float):
    """Adaptive KL (Wu et al. 2024): forward and reverse KL weighted by where the student's error sits.

    Sort the teacher's probabilities in descending order; the head is the top-1 token plus every token whose running
    total is <= mu (the token that first passes mu is tail, as in the authors' code). With the gaps
    g_h = sum_head |p - q| and g_t = sum_tail |p - q|, the loss is (g_h * FKL + g_t * RKL) / (g_h + g_t), and 0 where
    g_h + g_t = 0 (then p == q). The weights are constants for the gradient (detached, as in the authors' code).
    """
    teacher_sorted, order = teacher_logprobs.exp().sort(dim=-1, descending=True)
    student_sorted = student_logprobs.exp().gather(-1, order)
    in_head = teacher_sorted.cumsum(dim=-1) <= mu
    in_head[..., 0] = True
    gap = (teacher_sorted - student_sorted).abs()
    head_gap = torch.where(in_head, gap, 0.0).sum(dim=-1)
    tail_gap = torch.where(in_head, 0.0, gap).sum(dim=-1)
    total_gap = head_gap + tail_gap
    has_gap = total_gap > 0
    safe_total = torch.where(has_gap, total_gap, 1.0)
    head_weight = torch.where(has_gap, head_gap / safe_total, 0.0)
    tail_weight = torch.where(has_gap, tail_gap / safe_total, 0.0)
    forward_value, forward_grad = _forward_kl_per_position(student_logprobs, teacher_logprobs, with_grad)
    reverse_value, reverse_grad = _reverse_kl_per_position(student_logprobs, teacher_logprobs, with_grad)
    value = head_weight * forward_value + tail_weight * reverse_value
    if not with_grad:
        return value, None
    return value, head_weight.unsqueeze(-1) * forward_grad + tail_weight.unsqueeze(-1) * reverse_grad


_PER_POSITION = {
    "forward_kl": _forward_kl_per_position,
    "reverse_kl": _reverse_kl_per_position,
    "jsd": _jsd_per_position,
    "skew_kl": _skew_kl_per_position,
    "skew_rkl": _skew_rkl_per_position,
    "tvd": _tvd_per_position,
    "akl": _akl_per_position,
}


class _PerPositionDivergence(torch.autograd.Function):
    """[..., D] student and teacher log-probs -> [...] divergence; backward uses the loss's closed-form gradient."""

    @staticmethod
    def forward(ctx, student_logprobs, teacher_logprobs, loss_type, parameters):
        value, grad = _PER_POSITION[loss_type](
            student_logprobs, teacher_logprobs, with_grad=ctx.needs_input_grad[0], **parameters
        )
        ctx.save_for_backward(grad)  # [..., D] or None: nothing else is kept
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        return grad * grad_value.unsqueeze(-1), None, None, None


def _divergence_per_position(
    loss_type: str,
    student_logits: Tensor,
    teacher: Tensor | TopKTeacher,
    temperature: float,
    top_k: int | None,
    parameters: dict[str, float],
) -> Tensor:
    """[..., V] student logits + teacher -> [...] divergence per position. Shared by the dense and chunked paths."""
    student_logprobs, teacher_logprobs = _log_distributions(student_logits, teacher, temperature, top_k)
    return _PerPositionDivergence.apply(student_logprobs, teacher_logprobs, loss_type, parameters)


# ---------------------------------------------------------------------------------------------------------------
# Dense path
# ---------------------------------------------------------------------------------------------------------------


def _denominator(num_items, num_counted: Tensor | int, like: Tensor) -> Tensor:
    """num_items when given (the global token count), else the counted positions, at least 1 (no 0/0)."""
    if num_items is not None:
        return torch.as_tensor(num_items, device=like.device).to(like.dtype)
    return torch.as_tensor(num_counted, device=like.device).to(like.dtype).clamp(min=1)


def _parameter(name: str, value: float) -> dict[str, float]:
    """{name: value} for a per-position function, after checking the value's range."""
    _check_parameter(name, value)
    return {name: float(value)}


def _parameters_of(loss_type: str, beta: float, alpha: float, mu: float) -> dict[str, float]:
    """The one parameter `loss_type` uses, validated ({} for losses without one)."""
    name = _PARAMETER_OF.get(loss_type)
    return {} if name is None else _parameter(name, {"beta": beta, "alpha": alpha, "mu": mu}[name])


def _dense_divergence(
    loss_type, student_logits, teacher_logits, mask, temperature, num_items, teacher_top_k, parameters
) -> Tensor:
    _check_temperature(temperature)
    _check_top_k(teacher_top_k)
    lead_shape = student_logits.shape[:-1]
    if isinstance(teacher_logits, TopKTeacher):
        _check_lead_shape("teacher_logits (TopKTeacher)", teacher_logits.ids.shape[:-1], lead_shape)
    else:
        _check_vocab(student_logits.shape[-1], teacher_logits.shape[-1])
        _check_lead_shape("teacher_logits", teacher_logits.shape[:-1], lead_shape)
    if mask is not None:
        _check_lead_shape("mask", mask.shape, lead_shape)
        # Select the counted rows first: masked positions cost nothing and cannot leak NaN/inf into the sum.
        mask = mask.bool()
        student_logits = student_logits[mask]
        teacher_logits = (teacher_logits.select(mask) if isinstance(teacher_logits, TopKTeacher)
                          else teacher_logits[mask])
    per_position = _divergence_per_position(
        loss_type, student_logits, teacher_logits, temperature, teacher_top_k, parameters
    )
    return per_position.sum() / _denominator(num_items, per_position.numel(), per_position)


def forward_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None,
               teacher_top_k=None) -> Tensor:
    """Forward KL(p || q), p the teacher, q the student, reduced over counted positions (see module docstring).

    Args:
        student_logits: [..., V]
        teacher_logits: [..., V] dense logits, or a TopKTeacher ([..., k] ids and log-probs at `temperature`)
        mask: [...] bool, True = position counts (None: all positions)
        temperature: divides both sides' logits (a TopKTeacher's log-probs are used as given)
        num_items: divide the summed divergence by this (int or tensor) instead of the number of counted positions
        teacher_top_k: compare over the teacher's top-k tokens plus one rest bucket

    Returns:
        scalar tensor (float32, or float64 for float64 inputs); gradients flow into `student_logits` only.
    """
    return _dense_divergence("forward_kl", student_logits, teacher_logits, mask, temperature, num_items,
                             teacher_top_k, {})


def reverse_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None,
               teacher_top_k=None) -> Tensor:
    """Reverse KL(q || p). Arguments and reduction as :func:`forward_kl`."""
    return _dense_divergence("reverse_kl", student_logits, teacher_logits, mask, temperature, num_items,
                             teacher_top_k, {})


def jsd(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None, teacher_top_k=None,
        beta: float = 0.5) -> Tensor:
    """Generalized JSD with TRL's convention: beta=0 is forward KL(p||q), beta=1 reverse KL(q||p).

    ``beta * KL(p || m) + (1 - beta) * KL(q || m)``, ``m = beta * p + (1 - beta) * q``, beta in [0, 1].
    Arguments and reduction as :func:`forward_kl`.
    """
    return _dense_divergence("jsd", student_logits, teacher_logits, mask, temperature, num_items, teacher_top_k,
                             _parameter("beta", beta))


def skew_kl(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None, teacher_top_k=None,
            alpha: float = 0.1) -> Tensor:
    """Skew KL ``KL(p || alpha * p + (1 - alpha) * q)``, alpha in [0, 1). Arguments as :func:`forward_kl`."""
    return _dense_divergence("skew_kl", student_logits, teacher_logits, mask, temperature, num_items, teacher_top_k,
                             _parameter("alpha", alpha))


def skew_rkl(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None, teacher_top_k=None,
             alpha: float = 0.1) -> Tensor:
    """Skew reverse KL ``KL(q || alpha * q + (1 - alpha) * p)``, alpha in [0, 1). Arguments as :func:`forward_kl`."""
    return _dense_divergence("skew_rkl", student_logits, teacher_logits, mask, temperature, num_items,
                             teacher_top_k, _parameter("alpha", alpha))


def tvd(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None,
        teacher_top_k=None) -> Tensor:
    """Total variation distance ``0.5 * sum |p - q|``. Arguments and reduction as :func:`forward_kl`."""
    return _dense_divergence("tvd", student_logits, teacher_logits, mask, temperature, num_items, teacher_top_k, {})


def akl(student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None, teacher_top_k=None,
        mu: float = 0.5) -> Tensor:
    """Adaptive KL: ``(g_h * FKL + g_t * RKL) / (g_h + g_t)`` with detached head/tail gaps, mu in (0, 1].

    The head is the teacher's top-1 token plus every token whose sorted running total is <= mu (AKL, 2404.02657).
    Arguments and reduction as :func:`forward_kl`.
    """
    return _dense_divergence("akl", student_logits, teacher_logits, mask, temperature, num_items, teacher_top_k,
                             _parameter("mu", mu))


_PUBLIC = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
           "skew_rkl": skew_rkl, "tvd": tvd, "akl": akl}


def divergence(loss_type: str, student_logits, teacher_logits, *, mask=None, temperature=1.0, num_items=None,
               teacher_top_k=None, beta=0.5, alpha=0.1, mu=0.5) -> Tensor:
    """The divergence named `loss_type` (one of LOSS_TYPES); only that loss's own parameter is used.

    Arguments and reduction as :func:`forward_kl`; `beta` for jsd, `alpha` for skew_kl / skew_rkl, `mu` for akl.
    """
    _check_loss_type(loss_type)
    parameter = {name: value for name, value in (("beta", beta), ("alpha", alpha), ("mu", mu))
                 if name == _PARAMETER_OF.get(loss_type)}
    return _PUBLIC[loss_type](student_logits, teacher_logits, mask=mask, temperature=temperature,
                              num_items=num_items, teacher_top_k=teacher_top_k, **parameter)


# ---------------------------------------------------------------------------------------------------------------
# Chunked path
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class _ChunkPlan:
    """Everything the chunk loop needs besides the three differentiable inputs. Row tensors are flat [N, ...]."""

    loss_type: str
    parameters: dict
    rows: Tensor | None  # [M] flat indices of the counted rows; None = all N rows
    num_rows: int  # M
    chunk_size: int
    teacher_hidden: Tensor | None  # [N, H_t]
    teacher_weight: Tensor | None  # [V, H_t]
    teacher_bias: Tensor | None  # [V]
    teacher_logits: Tensor | TopKTeacher | None  # [N, V] or [N, k]
    labels: Tensor | None  # [N]
    ce_weight: float
    divergence_weight: float
    temperature: float
    top_k: int | None
    num_items: object
    with_stats: bool  # also count argmax agreement (an extra pass over the chunk's logits)

    def take(self, tensor: Tensor | None, start: int):
        """Rows start..start+chunk_size of the counted rows (views when every row counts)."""
        if tensor is None:
            return None
        if self.rows is None:
            return tensor[start:start + self.chunk_size]
        return tensor[self.rows[start:start + self.chunk_size]]

    def teacher_chunk(self, start: int) -> Tensor | TopKTeacher:
        """The teacher's logits (or top-k entries) for one chunk; projected here when given as hidden states."""
        if isinstance(self.teacher_logits, TopKTeacher):
            stored = self.teacher_logits
            return TopKTeacher(self.take(stored.ids, start), self.take(stored.logprobs, start),
                               self.take(stored.rest_logprobs, start))
        if self.teacher_logits is not None:
            return self.take(self.teacher_logits, start)
        with torch.no_grad():
            return F.linear(self.take(self.teacher_hidden, start), self.teacher_weight, self.teacher_bias)


def _teacher_argmax(teacher: Tensor | TopKTeacher) -> Tensor:
    """[c] the teacher's most likely token per row (for a TopKTeacher, the id with the largest stored log-prob)."""
    if isinstance(teacher, TopKTeacher):
        return teacher.ids.gather(-1, teacher.logprobs.argmax(dim=-1, keepdim=True)).squeeze(-1)
    return teacher.argmax(dim=-1)


def _run_chunks(plan: _ChunkPlan, student_hidden: Tensor, student_weight: Tensor, student_bias: Tensor | None,
                needs_grad: tuple[bool, bool, bool]):
    """The one loop that owns chunking: per chunk, logits -> loss -> gradients, accumulated; logits then freed.

    Args:
        student_hidden: [N, H] (detached), student_weight: [V, H], student_bias: [V] or None
        needs_grad: which of the three inputs want a gradient

    Returns:
        loss (scalar), (grad_hidden [N, H], grad_weight [V, H], grad_bias [V]) of the loss (None where not needed),
        and the stats vector [divergence, ce, num_tokens, agreement].
    """
    compute_dtype = _compute_dtype(student_hidden.dtype)
    accumulate_dtype = _compute_dtype(student_weight.dtype)
    device = student_hidden.device
    any_grad = any(needs_grad)
    grad_hidden = torch.zeros_like(student_hidden) if needs_grad[0] else None
    # Weight and bias gradients sum over chunks: accumulate them in float32 at least.
    grad_weight = torch.zeros(student_weight.shape, dtype=accumulate_dtype, device=device) if needs_grad[1] else None
    grad_bias = torch.zeros(student_bias.shape, dtype=accumulate_dtype, device=device) if needs_grad[2] else None
    with_ce = plan.labels is not None
    divergence_sum = torch.zeros((), dtype=compute_dtype, device=device)
    ce_sum = torch.zeros((), dtype=compute_dtype, device=device)
    agreeing = torch.zeros((), dtype=torch.long, device=device)
    denominator = _denominator(plan.num_items, plan.num_rows, divergence_sum)

    for start in range(0, plan.num_rows, plan.chunk_size):
        hidden = plan.take(student_hidden, start)  # [c, H]
        teacher = plan.teacher_chunk(start)  # [c, V] or TopKTeacher [c, k]
        # The loss is differentiated w.r.t. the chunk's logits only (a leaf); the projection's gradients are matmuls.
        with torch.no_grad():
            logits = F.linear(hidden, student_weight, student_bias)  # [c, V]
        logits.requires_grad_(any_grad)
        with torch.enable_grad():
            chunk_divergence = _divergence_per_position(
                plan.loss_type, logits, teacher, plan.temperature, plan.top_k, plan.parameters
            ).sum()
            objective = plan.divergence_weight * chunk_divergence
            if with_ce:
                # Cross entropy at temperature 1, on the student alone; -100 labels are skipped.
                chunk_ce = F.cross_entropy(logits.to(compute_dtype), plan.take(plan.labels, start),
                                           ignore_index=-100, reduction="sum")
                objective = objective + plan.ce_weight * chunk_ce
                ce_sum += chunk_ce.detach()
            objective = objective / denominator
        if any_grad:
            (grad_logits,) = torch.autograd.grad(objective, logits)  # [c, V]
            if grad_hidden is not None:
                # Under autocast the matmul comes out in half precision: store it in the hidden states' dtype.
                chunk_grad_hidden = (grad_logits @ student_weight).to(grad_hidden.dtype)  # [c, H]
                if plan.rows is None:
                    grad_hidden[start:start + plan.chunk_size] = chunk_grad_hidden
                else:
                    grad_hidden[plan.rows[start:start + plan.chunk_size]] = chunk_grad_hidden
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.t().to(accumulate_dtype), hidden.to(accumulate_dtype))
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0).to(accumulate_dtype)
        divergence_sum += chunk_divergence.detach()
        if plan.with_stats:
            agreeing += (logits.detach().argmax(dim=-1) == _teacher_argmax(teacher)).sum()
        del logits, teacher, objective, chunk_divergence  # free this chunk's [c, V] tensors before the next one
        if any_grad:
            del grad_logits

    divergence_value = divergence_sum / denominator
    ce_value = ce_sum / denominator
    loss = plan.divergence_weight * divergence_value + plan.ce_weight * ce_value
    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(student_weight.dtype),
        None if grad_bias is None else grad_bias.to(student_bias.dtype),
    )
    stats = torch.stack([
        divergence_value,
        ce_value,
        torch.tensor(float(plan.num_rows), dtype=compute_dtype, device=device),
        agreeing.to(compute_dtype) / max(plan.num_rows, 1),
    ])
    return loss, grads, stats


class _ChunkedDivergenceFunction(torch.autograd.Function):
    """Liger-Kernel style: gradients are computed during forward, chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, plan):
        needs_grad = tuple(ctx.needs_input_grad[:3])
        loss, grads, stats = _run_chunks(plan, student_hidden, student_weight, student_bias, needs_grad)
        ctx.has_grad = tuple(grad is not None for grad in grads)
        ctx.save_for_backward(*(grad for grad in grads if grad is not None))
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, grad_stats):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) if has_grad else None for has_grad in ctx.has_grad]
        return (*(None if grad is None else grad * grad_loss.to(grad.dtype) for grad in grads), None)


def chunked_divergence(
    loss_type: str,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    *,
    teacher_logits: Tensor | TopKTeacher | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    mask: Tensor | None = None,
    labels: Tensor | None = None,
    ce_weight: float = 0.0,
    divergence_weight: float = 1.0,
    temperature: float = 1.0,
    num_items=None,
    teacher_top_k: int | None = None,
    chunk_size: int = 256,
    beta: float = 0.5,
    alpha: float = 0.1,
    mu: float = 0.5,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """A divergence from LOSS_TYPES computed from hidden states, without ever building the full logits.

    ``loss = divergence_weight * divergence + ce_weight * CE(student, labels)``, both terms reduced like
    :func:`divergence` (summed over counted positions, divided by `num_items` or by the number of counted positions).
    The value and the gradients w.r.t. `student_hidden`, `student_weight` and `student_bias` equal those of the dense
    path ``divergence(loss_type, student_hidden @ student_weight.T + student_bias, teacher logits, ...)`` to float
    tolerance.

    How: the counted rows (mask True) are walked in chunks of `chunk_size`. For each chunk the student logits
    ``h @ W.T + b`` and the teacher logits (no grad) are built, the loss of the chunk is computed with the same
    per-position math as the dense path, and its gradient w.r.t. the chunk's logits is turned at once into the
    gradients w.r.t. the hidden chunk, the weight and the bias; the chunk's logits are then freed. Backward only
    scales the stored gradients by the incoming gradient (first-order only: no double backward).

    Memory: the extra memory is O(chunk_size * V) for the logits and their temporaries, plus the gradient buffers
    (the size of `student_hidden` and of `student_weight`); the dense path needs O(N * V) for both models' logits and
    the loss's temporaries. ``benchmarks/loss_memory.py`` measures this (see docs/benchmarks.md).

    Args:
        loss_type: one of LOSS_TYPES
        student_hidden: [..., H_s] final hidden states of the student (after the final norm)
        student_weight: [V, H_s] student output head weight (may require grad)
        teacher_hidden: [..., H_t] teacher final hidden states (treated as constant)
        teacher_weight: [V, H_t] teacher output head weight (treated as constant)
        teacher_logits: alternative to teacher_hidden/teacher_weight: [..., V] logits or a TopKTeacher ([..., k])
        student_bias: [V] or None; teacher_bias: [V] or None
        mask: [...] bool, True = position counts (None: all positions)
        labels: [...] long targets for the CE term (-100 = ignore); only counted positions contribute
        ce_weight, divergence_weight: weights of the two terms
        temperature: divides both sides' logits in the divergence (not in the CE term)
        num_items: denominator (int or tensor) instead of the number of counted positions
        teacher_top_k: compare over the teacher's top-k tokens plus a rest bucket
        chunk_size: rows per chunk (>= 1). The default 256 meets the benchmark's targets at V=32000 (memory <= 1/8
            of TRL's dense loss at 4096 rows); with a much larger vocabulary, lower it to bound chunk_size * V
        beta, alpha, mu: parameters of jsd, skew_kl / skew_rkl, akl (only the loss's own one is used)
        return_stats: also return detached stats

    Returns:
        The scalar loss, or ``(loss, stats)`` with detached ``stats["divergence"]`` (normalized divergence alone),
        ``stats["ce"]`` (normalized CE, 0 without labels), ``stats["num_tokens"]`` (counted positions) and
        ``stats["agreement"]`` (fraction of counted positions where student and teacher argmax agree).
    """
    _check_loss_type(loss_type)
    parameters = _parameters_of(loss_type, beta, alpha, mu)
    _check_temperature(temperature)
    _check_top_k(teacher_top_k)
    if isinstance(chunk_size, bool) or int(chunk_size) != chunk_size or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size}")

    hidden_size = student_hidden.shape[-1]
    lead_shape = student_hidden.shape[:-1]
    if student_weight.dim() != 2 or student_weight.shape[1] != hidden_size:
        raise ValueError(f"student_weight must be [V, {hidden_size}], got {tuple(student_weight.shape)}")
    vocab_size = student_weight.shape[0]
    if student_bias is not None and tuple(student_bias.shape) != (vocab_size,):
        raise ValueError(f"student_bias must be [{vocab_size}], got {tuple(student_bias.shape)}")

    from_hidden = teacher_hidden is not None or teacher_weight is not None
    if from_hidden == (teacher_logits is not None):
        raise ValueError("give the teacher either as teacher_hidden and teacher_weight, or as teacher_logits")
    if from_hidden:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("teacher_hidden and teacher_weight must be given together")
        _check_lead_shape("teacher_hidden", teacher_hidden.shape[:-1], lead_shape)
        if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[-1]:
            raise ValueError(
                f"teacher_weight must be [V, {teacher_hidden.shape[-1]}], got {tuple(teacher_weight.shape)}"
            )
        _check_vocab(vocab_size, teacher_weight.shape[0])
        teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    elif isinstance(teacher_logits, TopKTeacher):
        _check_lead_shape("teacher_logits (TopKTeacher)", teacher_logits.ids.shape[:-1], lead_shape)
        rest = teacher_logits.rest_logprobs
        teacher_logits = TopKTeacher(teacher_logits.ids.reshape(-1, teacher_logits.k),
                                     teacher_logits.logprobs.detach().reshape(-1, teacher_logits.k),
                                     None if rest is None else rest.detach().reshape(-1))
    else:
        _check_vocab(vocab_size, teacher_logits.shape[-1])
        _check_lead_shape("teacher_logits", teacher_logits.shape[:-1], lead_shape)
        teacher_logits = teacher_logits.detach().reshape(-1, vocab_size)
    if mask is not None:
        _check_lead_shape("mask", mask.shape, lead_shape)
    if labels is not None:
        _check_lead_shape("labels", labels.shape, lead_shape)

    flat_hidden = student_hidden.reshape(-1, hidden_size)
    if mask is None:
        rows, num_rows = None, flat_hidden.shape[0]
    else:
        rows = mask.reshape(-1).bool().nonzero().squeeze(1)
        num_rows = rows.numel()
    plan = _ChunkPlan(
        loss_type=loss_type, parameters=parameters, rows=rows, num_rows=num_rows, chunk_size=int(chunk_size),
        teacher_hidden=teacher_hidden if from_hidden else None, teacher_weight=teacher_weight,
        teacher_bias=teacher_bias if from_hidden else None,
        teacher_logits=None if from_hidden else teacher_logits,
        # The CE term is skipped when it neither weighs in nor is reported.
        labels=None if labels is None or (ce_weight == 0 and not return_stats) else labels.reshape(-1),
        ce_weight=float(ce_weight), divergence_weight=float(divergence_weight), temperature=float(temperature),
        top_k=teacher_top_k, num_items=num_items, with_stats=return_stats,
    )
    loss, stats = _ChunkedDivergenceFunction.apply(flat_hidden, student_weight, student_bias, plan)
    if not return_stats:
        return loss
    return loss, dict(zip(("divergence", "ce", "num_tokens", "agreement"), stats.unbind()))
