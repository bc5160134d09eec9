"""Training losses of one task: cross-entropy on labels, distillation to its teacher, or a mix."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .options import DISTILL, LABELS

# Teachers that end in a Softmax give probabilities; their logits are log(max(p, PROB_FLOOR)).
PROB_FLOOR = 1e-12


def teacher_logits(outputs: np.ndarray, head: str | None) -> np.ndarray:
    """Logits (up to a constant per sample) of a teacher's outputs, given the head the task ends in."""
    if head == "Softmax":
        return np.log(np.maximum(outputs, PROB_FLOOR)).astype(np.float32)
    return outputs.astype(np.float32, copy=False)


def distillation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) * T^2, averaged over the batch (Hinton et al.)."""
    log_p_student = F.log_softmax(student / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature ** 2


def task_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor | None,
              temperature: float, mix: float) -> torch.Tensor:
    """The loss of one batch: ``kind`` is labels, distill or mix (``mix`` weighs the cross-entropy)."""
    if kind == LABELS:
        return F.cross_entropy(student, labels)
    if kind == DISTILL:
        return distillation(student, teacher, temperature)
    return mix * F.cross_entropy(student, labels) + (1 - mix) * distillation(student, teacher, temperature)
