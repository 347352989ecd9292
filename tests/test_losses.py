"""Tests for trl_distill.losses: every divergence against a naive float64 reference, TRL's GKD loss, the top-k
rest bucket, the chunked path against the dense one, gradients and input validation. Small shapes: runs in seconds."""

import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from trl_distill.losses import (
    LOSS_TYPES,
    TopKTeacher,
    akl,
    chunked_divergence,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_rkl,
    teacher_topk,
    tvd,
)


PARAMETERS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_rkl": {"alpha": 0.2}, "akl": {"mu": 0.6}}
FUNCTIONS = {"forward_kl": forward_kl, "reverse_kl": reverse_kl, "jsd": jsd, "skew_kl": skew_kl,
             "skew_rkl": skew_rkl, "tvd": tvd, "akl": akl}


def logits(*shape, seed, scale=2.0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# ---------------------------------------------------------------------------------------------------------------
# Naive reference: Python floats, explicit probability formulas, one position at a time
# ---------------------------------------------------------------------------------------------------------------


def ref_softmax(row, temperature):
    scaled = [z / temperature for z in row]
    top = max(scaled)
    exps = [math.exp(z - top) for z in scaled]
    return [e / sum(exps) for e in exps]


def ref_kl(a, b):
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b) if ai > 0)


def ref_akl_weights(p, q, mu):
    order = sorted(range(len(p)), key=lambda i: -p[i])
    head, running = set(), 0.0
    for rank, i in enumerate(order):
        running += p[i]
        if rank == 0 or running <= mu:
            head.add(i)
    head_gap = sum(abs(p[i] - q[i]) for i in head)
    tail_gap = sum(abs(p[i] - q[i]) for i in range(len(p)) if i not in head)
    if head_gap + tail_gap == 0:
        return 0.0, 0.0
    return head_gap / (head_gap + tail_gap), tail_gap / (head_gap + tail_gap)


def ref_divergence(loss_type, p, q, beta=0.5, alpha=0.1, mu=0.5):
    """One position; p teacher, q student (lists of probabilities)."""
    if loss_type == "forward_kl" or (loss_type == "jsd" and beta == 0):
        return ref_kl(p, q)
    if loss_type == "reverse_kl" or (loss_type == "jsd" and beta == 1):
        return ref_kl(q, p)
    if loss_type == "jsd":
        m = [beta * pi + (1 - beta) * qi for pi, qi in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if loss_type == "skew_kl":
        return ref_kl(p, [alpha * pi + (1 - alpha) * qi for pi, qi in zip(p, q)])
    if loss_type == "skew_rkl":
        return ref_kl(q, [alpha * qi + (1 - alpha) * pi for pi, qi in zip(p, q)])
    if loss_type == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if loss_type == "akl":
        head_weight, tail_weight = ref_akl_weights(p, q, mu)
        return head_weight * ref_kl(p, q) + tail_weight * ref_kl(q, p)
    raise AssertionError(loss_type)


def ref_buckets(p, q, k):
    """The teacher's k most likely tokens plus a rest bucket, on both sides."""
    ids = sorted(range(len(p)), key=lambda i: -p[i])[:k]
    p_top, q_top = [p[i] for i in ids], [q[i] for i in ids]
    return p_top + [1 - sum(p_top)], q_top + [1 - sum(q_top)]


def ref_loss(loss_type, student, teacher, mask=None, temperature=1.0, num_items=None, k=None, **parameters):
    total, counted = 0.0, 0
    for position in itertools.product(*(range(n) for n in student.shape[:-1])):
        if mask is not None and not mask[position]:
            continue
        p = ref_softmax(teacher[position].tolist(), temperature)
        q = ref_softmax(student[position].tolist(), temperature)
        if k is not None:
            p, q = ref_buckets(p, q, k)
        total += ref_divergence(loss_type, p, q, **parameters)
        counted += 1
    return total / (num_items if num_items is not None else max(counted, 1))


# ---------------------------------------------------------------------------------------------------------------
# Dense divergences
# ---------------------------------------------------------------------------------------------------------------

CASES = [  # (use mask, num_items, temperature)
    (False, None, 1.0),
    (True, None, 1.0),
    (True, 17, 2.5),
    (False, 40, 0.7),
]


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("use_mask,num_items,temperature", CASES)
def test_matches_naive_reference(loss_type, use_mask, num_items, temperature):
    student, teacher = logits(3, 4, 9, seed=0), logits(3, 4, 9, seed=1)
    mask = torch.rand(3, 4, generator=torch.Generator().manual_seed(2)) > 0.4 if use_mask else None
    parameters = PARAMETERS.get(loss_type, {})
    ours = FUNCTIONS[loss_type](student, teacher, mask=mask, temperature=temperature, num_items=num_items,
                                **parameters)
    expected = ref_loss(loss_type, student, teacher, mask, temperature, num_items, **parameters)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    # the name dispatch gives the same, and uses only the loss's own parameter
    via_name = divergence(loss_type, student, teacher, mask=mask, temperature=temperature, num_items=num_items,
                          **{"beta": 0.3, "alpha": 0.2, "mu": 0.6})
    assert via_name.item() == ours.item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_float32_and_bfloat16_inputs_are_computed_in_float32(loss_type):
    student, teacher = logits(2, 5, 11, seed=3, dtype=torch.float32), logits(2, 5, 11, seed=4, dtype=torch.float32)
    full = divergence(loss_type, student, teacher)
    expected = ref_loss(loss_type, student.double(), teacher.double())
    assert full.dtype == torch.float32 and full.item() == pytest.approx(expected, rel=1e-5)
    half = divergence(loss_type, student.bfloat16(), teacher.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == divergence(loss_type, student.bfloat16().float(), teacher.bfloat16().float()).item()


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_mask_and_num_items_reduction(loss_type):
    student, teacher = logits(2, 6, 7, seed=5), logits(2, 6, 7, seed=6)
    mask = torch.tensor([[1, 1, 0, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    summed = divergence(loss_type, student, teacher, mask=mask, num_items=1)
    assert divergence(loss_type, student, teacher, mask=mask).item() == pytest.approx(summed.item() / 6)
    assert divergence(loss_type, student, teacher, mask=mask, num_items=torch.tensor(4)).item() == pytest.approx(
        summed.item() / 4)
    # masked positions do not count even when they hold garbage
    poisoned = student.clone()
    poisoned[~mask] = float("nan")
    assert divergence(loss_type, poisoned, teacher, mask=mask).item() == pytest.approx(summed.item() / 6)
    # an all-False mask gives 0, not 0/0
    empty = divergence(loss_type, student, teacher, mask=torch.zeros_like(mask))
    assert empty.item() == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exactly_zero_when_p_equals_q(loss_type, dtype):
    student = logits(3, 4, 13, seed=7, dtype=dtype).requires_grad_()
    teacher = student.detach().clone()
    parameters = PARAMETERS.get(loss_type, {})
    for options in ({}, {"teacher_top_k": 4}, {"teacher_top_k": 13}, {"temperature": 0.5}):
        value = FUNCTIONS[loss_type](student, teacher, **options, **parameters)
        assert value.item() == 0.0, options
        (grad,) = torch.autograd.grad(value, student)
        assert grad.abs().max().item() < 1e-6
    stored = teacher_topk(teacher, 5, temperature=2.0)
    assert FUNCTIONS[loss_type](student, stored, temperature=2.0, **parameters).item() == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.25])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
@pytest.mark.parametrize("num_items", [None, 23])
def test_jsd_equals_trl_generalized_jsd_loss(beta, temperature, num_items):
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    student = logits(2, 7, 31, seed=8, dtype=torch.float32).requires_grad_()
    teacher = logits(2, 7, 31, seed=9, dtype=torch.float32)
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(10)) > 0.3
    labels = torch.where(mask, torch.randint(0, 31, (2, 7), generator=torch.Generator().manual_seed(11)), -100)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature,
                                             num_items_in_batch=num_items)
    ours = jsd(student, teacher, mask=mask, beta=beta, temperature=temperature, num_items=num_items)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    (grad_theirs,) = torch.autograd.grad(theirs, student)
    (grad_ours,) = torch.autograd.grad(ours, student)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-4, atol=1e-7)


def test_masked_teacher_logits_give_finite_losses():
    # a -inf teacher logit is a token with zero teacher mass: no NaN, and the divergences that stay finite match
    student, teacher = logits(2, 3, 8, seed=12), logits(2, 3, 8, seed=13)
    teacher[..., :3] = float("-inf")
    student.requires_grad_()
    for loss_type in ("forward_kl", "jsd", "skew_kl", "skew_rkl", "tvd"):
        parameters = PARAMETERS.get(loss_type, {})
        value = divergence(loss_type, student, teacher, **parameters)
        expected = ref_loss(loss_type, student.detach(), teacher, **parameters)
        assert value.item() == pytest.approx(expected, rel=1e-10)
        (grad,) = torch.autograd.grad(value, student)
        assert torch.isfinite(grad).all()


def test_mode_seeking_gradients_vanish_on_a_confidently_wrong_student():
    # Why reverse KL, TVD, JSD and the skew divergences can stall from a fresh student (docs/losses.md; measured with benchmarks/gkd_divergences.py at commit fd8e762): their
    # gradient w.r.t. a logit is weighted by the student's own probability there, so a student sure of a wrong token
    # (teacher's tail flat) gets almost none, while forward KL's `q - p` stays of order 1.
    vocab = 8
    teacher = torch.zeros(1, vocab, dtype=torch.float64)
    teacher[0, 0] = 20.0  # sure of token 0, every other token equally unlikely
    student = torch.zeros(1, vocab, dtype=torch.float64)
    student[0, 3] = 20.0  # sure of token 3: confidently wrong
    norms = {}
    for loss_type in ("forward_kl", "reverse_kl", "tvd", "akl", "jsd", "skew_kl", "skew_rkl"):
        wrong = student.clone().requires_grad_()
        value = divergence(loss_type, wrong, teacher, **PARAMETERS.get(loss_type, {}))
        (grad,) = torch.autograd.grad(value, wrong)
        norms[loss_type] = (value.item(), grad.norm().item())
    assert norms["forward_kl"][1] > 1.0
    assert norms["reverse_kl"][0] > 19.0 and norms["reverse_kl"][1] < 1e-6  # loss near its maximum, no gradient
    assert norms["tvd"][0] > 0.99 and norms["tvd"][1] < 1e-6
    # The mixtures too (JSD, skew KL, skew reverse KL): bounded losses at their maximum, no gradient. Each mixes the
    # student's near-zero probability of the right token into a term whose gradient, through the softmax, is scaled
    # by that probability again (docs/benchmarks.md: all three stall from a fresh student on the HMM task).
    for loss_type in ("jsd", "skew_kl", "skew_rkl"):
        assert norms[loss_type][1] < 1e-6, (loss_type, norms[loss_type])
    # AKL keeps half of forward KL's gradient here: head {0} and tail differ from the student equally (g_h = g_t)
    assert norms["akl"][1] == pytest.approx(0.5 * norms["forward_kl"][1], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Top-k teacher + rest bucket
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_top_k_with_k_equal_vocab_equals_dense(loss_type, dtype):
    vocab = 17
    student = logits(3, 5, vocab, seed=14, dtype=dtype).requires_grad_()
    teacher = logits(3, 5, vocab, seed=15, dtype=dtype)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(16)) > 0.3
    parameters = PARAMETERS.get(loss_type, {})
    dense = FUNCTIONS[loss_type](student, teacher, mask=mask, temperature=1.5, **parameters)
    for k in (vocab, vocab + 10):  # k >= V keeps the whole vocabulary
        top_k = FUNCTIONS[loss_type](student, teacher, mask=mask, temperature=1.5, teacher_top_k=k, **parameters)
        (grad_dense,) = torch.autograd.grad(dense, student, retain_graph=True)
        (grad_top_k,) = torch.autograd.grad(top_k, student)
        assert torch.isfinite(grad_top_k).all()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-12
        assert top_k.item() == pytest.approx(dense.item(), rel=tolerance, abs=tolerance)
        torch.testing.assert_close(grad_top_k, grad_dense, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("k", [1, 3])
def test_top_k_matches_bucket_reference(loss_type, k):
    student, teacher = logits(2, 4, 10, seed=17), logits(2, 4, 10, seed=18)
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    parameters = PARAMETERS.get(loss_type, {})
    ours = divergence(loss_type, student, teacher, mask=mask, temperature=1.3, teacher_top_k=k, num_items=9,
                      **parameters)
    expected = ref_loss(loss_type, student, teacher, mask, 1.3, 9, k=k, **parameters)
    assert ours.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_stored_top_k_teacher_equals_teacher_top_k(loss_type):
    student = logits(2, 6, 12, seed=19).requires_grad_()
    teacher = logits(2, 6, 12, seed=20)
    parameters = PARAMETERS.get(loss_type, {})
    stored = teacher_topk(teacher, 4, temperature=0.9)
    assert stored.ids.shape == (2, 6, 4) and stored.ids.dtype == torch.int64
    assert (stored.logprobs[..., :-1] >= stored.logprobs[..., 1:]).all()  # sorted, most likely first
    via_stored = FUNCTIONS[loss_type](student, stored, temperature=0.9, **parameters)
    via_top_k = FUNCTIONS[loss_type](student, teacher, temperature=0.9, teacher_top_k=4, **parameters)
    assert via_stored.item() == pytest.approx(via_top_k.item(), rel=1e-12)
    torch.testing.assert_close(torch.autograd.grad(via_stored, student)[0],
                               torch.autograd.grad(via_top_k, student)[0])
    # a stored teacher with more (and shuffled) entries keeps its top teacher_top_k
    wide = teacher_topk(teacher, 8, temperature=0.9)
    shuffle = torch.randperm(8, generator=torch.Generator().manual_seed(21))
    shuffled = TopKTeacher(ids=wide.ids[..., shuffle], logprobs=wide.logprobs[..., shuffle])
    sliced = FUNCTIONS[loss_type](student, shuffled, temperature=0.9, teacher_top_k=4, **parameters)
    assert sliced.item() == pytest.approx(via_top_k.item(), rel=1e-12)


def confident_student(teacher, k, rest_mass, seed):
    """float64 student logits whose mass outside the teacher's top-k tokens is exactly `rest_mass` at every row."""
    top_ids = teacher.topk(k, dim=-1).indices
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(teacher.shape, generator=generator, dtype=torch.float64)  # outside: c + noise
    inside = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, top_ids, True)
    top_total = torch.where(inside, student.exp(), 0.0).sum(dim=-1, keepdim=True)
    outside_total = torch.where(inside, 0.0, student.exp()).sum(dim=-1, keepdim=True)
    shift = (rest_mass * top_total / (outside_total * (1 - rest_mass))).log()
    return torch.where(inside, student, student + shift)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("rest_mass", [2e-7, 1.3e-9])
def test_float32_top_k_rest_bucket_is_exact_for_a_confident_student(loss_type, rest_mass):
    # Issue 16: the student's rest was 1 - sum(exp(top-k)) in float32, which cancels when the student puts almost no
    # mass outside the teacher's top-k (forward KL at rest 1.3e-9 gave 14.30 instead of 17.32). It is now a
    # log-sum-exp over the other tokens: float32 must match float64, value and gradient, dense and chunked.
    vocab, k = 100, 5
    teacher = logits(3, vocab, seed=60)
    student = confident_student(teacher, k, rest_mass, seed=61)
    outside_mass = F.softmax(student, -1).scatter(-1, teacher.topk(k, -1).indices, 0.0).sum(-1)
    torch.testing.assert_close(outside_mass, torch.full((3,), rest_mass, dtype=torch.float64), rtol=1e-9, atol=0)
    parameters = PARAMETERS.get(loss_type, {})
    results = {}
    for dtype in (torch.float64, torch.float32):
        z = student.to(dtype).requires_grad_()
        value = FUNCTIONS[loss_type](z, teacher.to(dtype), teacher_top_k=k, **parameters)
        (grad,) = torch.autograd.grad(value, z)
        stored = FUNCTIONS[loss_type](z, teacher_topk(teacher.to(dtype), k), **parameters)
        assert stored.item() == pytest.approx(value.item(), rel=1e-6)
        eye = torch.eye(vocab, dtype=dtype)  # chunked path: hidden states = logits, identity head
        chunked = chunked_divergence(loss_type, z, eye, teacher_logits=teacher.to(dtype), teacher_top_k=k,
                                     chunk_size=2, **parameters)
        (chunked_grad,) = torch.autograd.grad(chunked, z)
        results[dtype] = (value.item(), grad.double(), chunked.item(), chunked_grad.double())
    exact_value, exact_grad, _, _ = results[torch.float64]
    assert exact_value == pytest.approx(ref_loss(loss_type, student, teacher, k=k, **parameters), rel=1e-8)
    value32, grad32, chunked32, chunked_grad32 = results[torch.float32]
    assert value32 == pytest.approx(exact_value, rel=1e-5, abs=1e-6)
    assert chunked32 == pytest.approx(exact_value, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad32, exact_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked_grad32, exact_grad, rtol=1e-4, atol=1e-6)


def test_stored_rest_is_used_and_merged_when_slicing():
    # the stored rest enters the rest bucket as given; a stored teacher without it falls back to 1 - sum
    teacher, student = logits(4, 30, seed=62), logits(4, 30, seed=63).requires_grad_()
    wide = teacher_topk(teacher, 8)
    expected_rest = torch.log1p(-F.softmax(teacher, -1).topk(8, -1).values.sum(-1))
    torch.testing.assert_close(wide.rest_logprobs, expected_rest)
    no_rest = TopKTeacher(wide.ids, wide.logprobs)
    assert forward_kl(student, no_rest).item() == pytest.approx(forward_kl(student, wide).item(), rel=1e-10)
    # slicing to top 3 moves the 5 dropped entries into the rest
    sliced = forward_kl(student, wide, teacher_top_k=3)
    assert sliced.item() == pytest.approx(forward_kl(student, teacher, teacher_top_k=3).item(), rel=1e-12)
    with pytest.raises(ValueError, match="rest_logprobs"):
        TopKTeacher(wide.ids, wide.logprobs, wide.rest_logprobs[:2])


# ---------------------------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", [name for name in LOSS_TYPES if name != "akl"])
@pytest.mark.parametrize("top_k", [None, 3])
def test_gradcheck_dense(loss_type, top_k):
    student = logits(2, 3, 7, seed=22).requires_grad_()
    teacher = logits(2, 3, 7, seed=23)
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    parameters = PARAMETERS.get(loss_type, {})
    assert torch.autograd.gradcheck(
        lambda z: FUNCTIONS[loss_type](z, teacher, mask=mask, temperature=1.7, teacher_top_k=top_k, **parameters),
        (student,),
    )


@pytest.mark.parametrize("top_k", [None, 3])
def test_akl_gradient_treats_head_tail_weights_as_constants(top_k):
    # gradcheck does not apply as is: AKL's weights are detached by design, so a finite difference of the loss also
    # moves them. The gradient must equal the finite difference of (w_h * FKL + w_t * RKL) with w frozen.
    student, teacher = logits(2, 3, 7, seed=24), logits(2, 3, 7, seed=25)
    mu = 0.6

    def distributions(z, position):
        p = ref_softmax(teacher[position].tolist(), 1.0)
        q = ref_softmax(z[position].tolist(), 1.0)
        return ref_buckets(p, q, top_k) if top_k else (p, q)

    positions = list(itertools.product(range(2), range(3)))
    weights = {pos: ref_akl_weights(*distributions(student, pos), mu) for pos in positions}

    def frozen_loss(z):
        total = 0.0
        for pos in positions:
            p, q = distributions(z, pos)
            total += weights[pos][0] * ref_kl(p, q) + weights[pos][1] * ref_kl(q, p)
        return total / len(positions)

    z = student.clone().requires_grad_()
    (grad,) = torch.autograd.grad(akl(z, teacher, mu=mu, teacher_top_k=top_k), z)
    numeric = torch.zeros_like(student)
    step = 1e-6
    for index in itertools.product(*(range(n) for n in student.shape)):
        plus, minus = student.clone(), student.clone()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (frozen_loss(plus) - frozen_loss(minus)) / (2 * step)
    torch.testing.assert_close(grad, numeric, rtol=1e-6, atol=1e-8)


# ---------------------------------------------------------------------------------------------------------------
# Chunked path
# ---------------------------------------------------------------------------------------------------------------

ROWS, HIDDEN, VOCAB = (3, 8), 6, 13  # 24 rows


def heads(seed, bias=True, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(*ROWS, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    student_weight = torch.randn(VOCAB, HIDDEN, generator=generator, dtype=dtype).requires_grad_()
    student_bias = torch.randn(VOCAB, generator=generator, dtype=dtype).requires_grad_() if bias else None
    teacher_hidden = torch.randn(*ROWS, HIDDEN + 2, generator=generator, dtype=dtype)
    teacher_weight = torch.randn(VOCAB, HIDDEN + 2, generator=generator, dtype=dtype)
    teacher_bias = torch.randn(VOCAB, generator=generator, dtype=dtype)
    mask = torch.rand(*ROWS, generator=generator) > 0.3
    labels = torch.randint(0, VOCAB, ROWS, generator=generator)
    labels[torch.rand(*ROWS, generator=generator) < 0.2] = -100
    return student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, mask, labels


def dense_reference(loss_type, student_hidden, student_weight, student_bias, teacher_logits, mask, labels,
                    ce_weight, num_items, **options):
    """Full logits, then `divergence`, plus the CE term reduced with the same denominator."""
    student_logits = F.linear(student_hidden, student_weight, student_bias)
    loss = divergence(loss_type, student_logits, teacher_logits, mask=mask, num_items=num_items, **options)
    if ce_weight:
        counted = labels if mask is None else torch.where(mask, labels, -100)
        ce = F.cross_entropy(student_logits.reshape(-1, VOCAB), counted.reshape(-1), ignore_index=-100,
                             reduction="sum")
        counted_positions = labels.numel() if mask is None else max(int(mask.sum()), 1)
        loss = loss + ce_weight * ce / (num_items if num_items is not None else counted_positions)
    return loss


def assert_chunked_equals_dense(loss_type, chunk_size, use_mask=True, num_items=None, ce_weight=0.0, top_k=None,
                                teacher_as="hidden", temperature=1.4, bias=True, seed=26):
    sh, sw, sb, th, tw, tb, mask, labels = heads(seed, bias=bias)
    mask = mask if use_mask else None
    parameters = PARAMETERS.get(loss_type, {})
    teacher_logits = F.linear(th, tw, tb)
    teacher = {"hidden": dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb),
               "logits": dict(teacher_logits=teacher_logits),
               "stored": dict(teacher_logits=teacher_topk(teacher_logits, 5, temperature))}[teacher_as]
    dense_teacher = teacher["teacher_logits"] if teacher_as == "stored" else teacher_logits
    inputs = [sh, sw] + ([sb] if bias else [])

    expected = dense_reference(loss_type, sh, sw, sb, dense_teacher, mask, labels, ce_weight, num_items,
                               temperature=temperature, teacher_top_k=top_k, **parameters)
    expected_grads = torch.autograd.grad(expected, inputs)
    ours = chunked_divergence(loss_type, sh, sw, **teacher, student_bias=sb, mask=mask, labels=labels,
                              ce_weight=ce_weight, temperature=temperature, num_items=num_items,
                              teacher_top_k=top_k, chunk_size=chunk_size, **parameters)
    grads = torch.autograd.grad(ours, inputs)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("chunk_size", [1, 6, 7, 1024])  # 24 rows (fewer when masked): divides, doesn't, one chunk
def test_chunked_equals_dense(loss_type, chunk_size):
    assert_chunked_equals_dense(loss_type, chunk_size)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_chunked_equals_dense_variants(loss_type):
    assert_chunked_equals_dense(loss_type, 5, use_mask=False, bias=False)
    assert_chunked_equals_dense(loss_type, 5, num_items=torch.tensor(31))
    assert_chunked_equals_dense(loss_type, 5, top_k=4)
    assert_chunked_equals_dense(loss_type, 5, top_k=VOCAB)
    assert_chunked_equals_dense(loss_type, 5, ce_weight=0.7, num_items=19)
    assert_chunked_equals_dense(loss_type, 5, ce_weight=0.7, use_mask=False)
    assert_chunked_equals_dense(loss_type, 5, teacher_as="logits")
    assert_chunked_equals_dense(loss_type, 5, teacher_as="stored")
    assert_chunked_equals_dense(loss_type, 5, teacher_as="stored", top_k=3)


def test_chunked_divergence_weight_and_partial_grads():
    sh, sw, sb, th, tw, tb, mask, labels = heads(27)
    frozen_weight = sw.detach()
    ours = chunked_divergence("jsd", sh, frozen_weight, th, tw, mask=mask, labels=labels, ce_weight=0.5,
                              divergence_weight=2.0, chunk_size=4)
    student_logits = F.linear(sh, frozen_weight)
    ce = F.cross_entropy(student_logits[mask], labels[mask], ignore_index=-100, reduction="sum") / mask.sum()
    expected = 2.0 * jsd(student_logits, F.linear(th, tw), mask=mask) + 0.5 * ce
    assert ours.item() == pytest.approx(expected.item(), rel=1e-12)
    # the stored gradients are scaled by the incoming gradient
    (grad,) = torch.autograd.grad(3.0 * ours, sh)
    torch.testing.assert_close(grad, torch.autograd.grad(3.0 * expected, sh)[0])
    with torch.no_grad():  # evaluation: no gradients computed, same value
        assert chunked_divergence("jsd", sh, sw, th, tw, mask=mask, chunk_size=4).item() == pytest.approx(
            jsd(F.linear(sh, sw), F.linear(th, tw), mask=mask).item(), rel=1e-12)


def test_chunked_return_stats():
    sh, sw, sb, th, tw, tb, mask, labels = heads(28)
    loss, stats = chunked_divergence("forward_kl", sh, sw, th, tw, student_bias=sb, teacher_bias=tb, mask=mask,
                                     labels=labels, ce_weight=0.25, chunk_size=5, num_items=20, return_stats=True)
    student_logits, teacher_logits = F.linear(sh, sw, sb), F.linear(th, tw, tb)
    divergence_value = forward_kl(student_logits, teacher_logits, mask=mask, num_items=20)
    ce_value = F.cross_entropy(student_logits[mask], labels[mask], ignore_index=-100, reduction="sum") / 20
    agreement = (student_logits.argmax(-1) == teacher_logits.argmax(-1))[mask].double().mean()
    assert set(stats) == {"divergence", "ce", "num_tokens", "agreement"}
    assert all(not value.requires_grad for value in stats.values())
    assert stats["divergence"].item() == pytest.approx(divergence_value.item(), rel=1e-12)
    assert stats["ce"].item() == pytest.approx(ce_value.item(), rel=1e-12)
    assert stats["num_tokens"].item() == mask.sum().item()
    assert stats["agreement"].item() == pytest.approx(agreement.item())
    assert 0 < stats["agreement"].item() < 1  # the check can fail both ways
    assert loss.item() == pytest.approx(divergence_value.item() + 0.25 * ce_value.item(), rel=1e-12)
    # a stored teacher's argmax is its most likely stored id; no labels -> ce is 0
    _, stored_stats = chunked_divergence("forward_kl", sh, sw, teacher_logits=teacher_topk(teacher_logits, 3),
                                         student_bias=sb, mask=mask, chunk_size=5, return_stats=True)
    assert stored_stats["agreement"].item() == pytest.approx(agreement.item())
    assert stored_stats["ce"].item() == 0.0


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd", "skew_rkl", "tvd"])
def test_gradcheck_chunked(loss_type):
    # akl is left out: its detached weights move under a finite difference (see the akl gradient test above);
    # chunked akl gradients equal the dense ones in test_chunked_equals_dense.
    generator = torch.Generator().manual_seed(29)
    sh, th = (torch.randn(2, 4, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    sw, tw = (torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    sb = torch.randn(6, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]], dtype=torch.bool)
    labels = torch.tensor([[2, -100, 1, 5], [0, 3, -100, 4]])
    parameters = PARAMETERS.get(loss_type, {})
    assert torch.autograd.gradcheck(
        lambda h, w, b: chunked_divergence(loss_type, h, w, th, tw, student_bias=b, mask=mask, labels=labels,
                                           ce_weight=0.3, temperature=1.2, teacher_top_k=4, chunk_size=4,
                                           **parameters),
        (sh.requires_grad_(), sw.requires_grad_(), sb.requires_grad_()),
    )


def test_chunked_bfloat16_matches_dense_bfloat16():
    sh, sw, sb, th, tw, tb, mask, labels = heads(30, dtype=torch.float32)
    sh, sw = sh.detach().bfloat16().requires_grad_(), sw.detach().bfloat16().requires_grad_()
    th, tw = th.bfloat16(), tw.bfloat16()
    expected = jsd(sh @ sw.T, th @ tw.T, mask=mask)
    ours = chunked_divergence("jsd", sh, sw, th, tw, mask=mask, chunk_size=5)
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    for grad, expected_grad in zip(torch.autograd.grad(ours, (sh, sw)), torch.autograd.grad(expected, (sh, sw))):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad.float(), expected_grad.float(), rtol=2e-2, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("call,field", [
    (lambda s, t: divergence("kl", s, t), "loss_type"),
    (lambda s, t: jsd(s, t, beta=1.5), "beta"),
    (lambda s, t: jsd(s, t, beta=-0.1), "beta"),
    (lambda s, t: skew_kl(s, t, alpha=1.0), "alpha"),
    (lambda s, t: skew_rkl(s, t, alpha=-0.5), "alpha"),
    (lambda s, t: akl(s, t, mu=0.0), "mu"),
    (lambda s, t: akl(s, t, mu=1.2), "mu"),
    (lambda s, t: divergence("jsd", s, t, beta=float("nan")), "beta"),
    (lambda s, t: forward_kl(s, t, temperature=0.0), "temperature"),
    (lambda s, t: tvd(s, t, temperature=-1.0), "temperature"),
    (lambda s, t: reverse_kl(s, t, teacher_top_k=0), "teacher_top_k"),
    (lambda s, t: teacher_topk(t, 0), "k"),
    (lambda s, t: forward_kl(s, t, mask=torch.ones(2, dtype=torch.bool)), "mask"),
    (lambda s, t: forward_kl(s, teacher_topk(t, 2), teacher_top_k=3), "teacher_top_k"),  # more than stored
])
def test_invalid_arguments_name_the_field(call, field):
    student, teacher = logits(2, 3, 5, seed=31), logits(2, 3, 5, seed=32)
    with pytest.raises(ValueError, match=field):
        call(student, teacher)


def test_loss_type_error_lists_the_choices():
    with pytest.raises(ValueError, match="forward_kl.*akl"):
        chunked_divergence("kl", torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 4))


def test_vocab_mismatch_names_both_sizes():
    with pytest.raises(ValueError, match=r"\(7\).*\(9\)"):
        forward_kl(torch.randn(2, 7), torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"\(7\).*\(9\)"):
        chunked_divergence("jsd", torch.randn(2, 4), torch.randn(7, 4), torch.randn(2, 3), torch.randn(9, 3))
    with pytest.raises(ValueError, match=r"\(7\).*\(9\)"):
        chunked_divergence("jsd", torch.randn(2, 4), torch.randn(7, 4), teacher_logits=torch.randn(2, 9))


@pytest.mark.parametrize("options,field", [
    ({"chunk_size": 0}, "chunk_size"),
    ({"chunk_size": 2.5}, "chunk_size"),
    ({"teacher_top_k": -1}, "teacher_top_k"),
    ({"temperature": 0}, "temperature"),
    ({"mu": 0}, "mu"),
    ({"beta": 2}, "beta"),
])
def test_chunked_invalid_arguments_name_the_field(options, field):
    loss_type = {"mu": "akl", "beta": "jsd"}.get(field, "forward_kl")
    with pytest.raises(ValueError, match=field):
        chunked_divergence(loss_type, torch.randn(3, 4), torch.randn(5, 4), torch.randn(3, 4), torch.randn(5, 4),
                           **options)


def test_chunked_teacher_must_be_given_one_way():
    hidden, weight = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="teacher"):
        chunked_divergence("jsd", hidden, weight)
    with pytest.raises(ValueError, match="teacher"):
        chunked_divergence("jsd", hidden, weight, hidden, weight, teacher_logits=torch.randn(3, 5))
    with pytest.raises(ValueError, match="teacher_hidden and teacher_weight"):
        chunked_divergence("jsd", hidden, weight, hidden)
