"""Knowledge distillation from the dense model into the pruned one (Minitron-style recovery).

``loss = alpha · KL(teacher ‖ student) · T² + (1 − alpha) · CE`` over the positions that carry
a label (prompt tokens masked with -100 take part in neither term). ``T²`` keeps the gradient
scale of the soft term independent of the temperature (Hinton et al., 2015).

Memory: the teacher is a second copy of the dense model (weights only: it runs under
``no_grad``, so no activations are kept for backward) plus one (batch, tokens, vocab) logits
tensor per step. ``top_k`` keeps only the teacher's k largest probabilities per position (plus
the mass of everything else as one bucket) and computes the KL on that support, which is what
makes caching teacher outputs (or shipping them across devices) affordable for 50K-token
vocabularies: k + 1 numbers per token instead of the vocabulary size.

Example:
    >>> import torch
    >>> s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    >>> labels = torch.randint(0, 11, (2, 5))
    >>> out = distillation_loss(s, t, labels, alpha=0.0)
    >>> bool(torch.isclose(out.loss, out.ce))
    True
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import PrunerError

IGNORE_INDEX = -100


class DistillationLoss(NamedTuple):
    loss: torch.Tensor  # what to back-propagate
    kl: torch.Tensor  # KL(teacher ‖ student) at temperature T, mean over labelled positions
    ce: torch.Tensor  # the student's next-token cross entropy (HF's causal-LM loss)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def check_distillation_args(alpha: float, temperature: float, top_k: int | None) -> None:
    """Raises ``PrunerError`` (a ``ValueError``) naming the argument; shared by the module and the CLI."""
    from ..checks import check_int, check_number

    check_number("distillation alpha", alpha, 0.0, 1.0, fix="0 = plain cross entropy, 1 = KL only")
    check_number("distillation temperature", temperature, 0.0, low_open=True,
                 fix="1 = the teacher's own distribution")
    if top_k is not None:
        check_int("distillation top_k", top_k, 1, fix="or None for the full vocabulary")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      alpha: float = 0.5, temperature: float = 2.0, top_k: int | None = None) -> DistillationLoss:
    """Distillation loss of causal-LM logits ``(B, T, V)`` against ``labels (B, T)``.

    Logits at position t predict the label at t+1 (the same shift as HF's loss); positions
    whose next label is -100 are ignored. ``teacher_logits`` may also be ``(B, T-1, V)``:
    positions 0..T-2 only (the teacher states cached with generated text have no last one).
    With ``top_k`` the teacher distribution is its softmax over its k largest logits, and the
    student is scored on those k tokens."""
    check_distillation_args(alpha, temperature, top_k)
    s = student_logits[:, :-1].float()  # (B, T-1, V)
    if teacher_logits.shape[1] not in (s.shape[1], s.shape[1] + 1) or teacher_logits.shape[::2] != s.shape[::2]:
        raise PrunerError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                          f"{tuple(student_logits.shape)}: give (B, T, V) or (B, T-1, V) of the same batch")
    t = teacher_logits[:, : s.shape[1]].float().detach()
    target = labels[:, 1:]  # (B, T-1)
    mask = target != IGNORE_INDEX
    n = mask.sum().clamp_min(1)
    # Per-position terms weighted by the mask rather than s[mask]: gathering the labelled rows
    # copies the (B, T-1, V) logits forward and scatters them back in the backward (7 % of a
    # SmolLM2 step on a CPU), for nothing when every position is labelled.
    log_probs = F.log_softmax(s, dim=-1)  # (B, T-1, V)
    nll = -log_probs.gather(-1, target.masked_fill(~mask, 0)[..., None])[..., 0]  # (B, T-1)
    ce = torch.where(mask, nll, 0.0).sum() / n
    if alpha == 0.0:
        return DistillationLoss(ce, torch.zeros((), device=ce.device), ce)
    s_log = log_probs if temperature == 1.0 else F.log_softmax(s / temperature, dim=-1)  # the CE's, reused at T=1
    t_log = F.log_softmax(t / temperature, dim=-1)
    if top_k is not None and top_k < t_log.shape[-1]:
        # KL of the coarsened distributions over {teacher's top k tokens, everything else}:
        # exact on that support, zero when the models agree, and the "rest" bucket still
        # pushes the student's mass off tokens the teacher considers unlikely.
        t_log, idx = t_log.topk(top_k, dim=-1)  # (B, T-1, k)
        s_log = s_log.gather(-1, idx)
        t_log = torch.cat([t_log, _log1mexp(t_log.logsumexp(-1, keepdim=True))], -1)  # (B, T-1, k+1)
        s_log = torch.cat([s_log, _log1mexp(s_log.logsumexp(-1, keepdim=True))], -1)
    kl = torch.where(mask, (t_log.exp() * (t_log - s_log)).sum(-1), 0.0).sum() / n
    loss = alpha * kl * temperature**2 + (1.0 - alpha) * ce
    return DistillationLoss(loss, kl, ce)
