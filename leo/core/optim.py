"""The outer update (docs/model.md, point 11): NaN fallback, clipping, Adam as in TensorFlow.

All pure tensor code without host synchronisation, so it runs unchanged on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leo.core.model import STEP_SIZE_NAMES, Params


def nan_fallback(params: Params, loss: Tensor, grads: dict[str, Tensor]) -> dict[str, Tensor]:
    """If the loss or any gradient is NaN, use the gradients of 1e-4 * sum(w^2)/2 instead.

    The reference replaces the gradients by those of ``(1e-4 / lambda1) * (lambda1 * L2)``:
    a pull of every network weight towards zero (``1e-4 * w``) and zero for the step sizes.
    """
    bad = torch.isnan(loss)
    for g in grads.values():
        bad = bad | torch.isnan(g).any()
    out = {}
    for name, g in grads.items():
        fallback = torch.zeros_like(g) if name in STEP_SIZE_NAMES else 1e-4 * params[name].detach()
        out[name] = torch.where(bad, fallback, g)
    return out


def clip_gradients(grads: dict[str, Tensor], value: float, norm: float) -> dict[str, Tensor]:
    """Clip every element to +-value, then each tensor's norm to ``norm`` (tf.clip_by_norm)."""
    out = {}
    for name, g in grads.items():
        if value > 0:
            g = g.clamp(-value, value)
        if norm > 0:
            l2 = torch.linalg.vector_norm(g)
            g = g * (norm / torch.maximum(l2, torch.full_like(l2, norm)))
        out[name] = g
    return out


class Adam:
    """tf.train.AdamOptimizer: lr_t = lr sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t m / (sqrt(v) + eps).

    (PyTorch's Adam puts eps inside the bias correction; the difference is tiny but this is
    the update the published numbers were trained with.)
    """

    def __init__(self, params: Params, lr: float, b1=0.9, b2=0.999, eps=1e-8) -> None:
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.step_count = 0
        self.m = {k: torch.zeros_like(v) for k, v in params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in params.items()}

    @torch.no_grad()
    def step(self, params: Params, grads: dict[str, Tensor]) -> None:
        """Update ``params`` in place."""
        self.step_count += 1
        t = self.step_count
        lr_t = self.lr * (1 - self.b2**t) ** 0.5 / (1 - self.b1**t)
        names = list(grads)
        m = [self.m[k] for k in names]
        v = [self.v[k] for k in names]
        g = [grads[k] for k in names]
        torch._foreach_lerp_(m, g, 1 - self.b1)
        torch._foreach_mul_(v, self.b2)
        torch._foreach_addcmul_(v, g, g, value=1 - self.b2)
        denom = torch._foreach_add(torch._foreach_sqrt(v), self.eps)
        torch._foreach_addcdiv_([params[k] for k in names], m, denom, value=-lr_t)

    def state_dict(self) -> dict:
        """Tensors and numbers only (loadable with weights_only=True)."""
        return {"step": self.step_count, "m": self.m, "v": self.v, "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output."""
        self.step_count = int(state["step"])
        self.m = {k: t.clone() for k, t in state["m"].items()}
        self.v = {k: t.clone() for k, t in state["v"].items()}
