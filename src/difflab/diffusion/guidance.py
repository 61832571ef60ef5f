"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around the network.

The guided prediction is  out = out_uncond + scale * (out_cond - out_uncond)  (their
eq. 6 written with w = scale - 1). The combination is taken on the network's raw output:
eps, x0 and v are each affine in that output for a fixed (x_t, t), so guiding the raw
output equals guiding any of them, and every sampler gets guidance through the one
`Denoiser`. scale 0 gives the unconditional prediction, scale 1 the conditional one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

Network = Callable[..., torch.Tensor]
# The condition-dict key of a per-row drop mask that difflab.models.conditioning.Conditioner
# reads (bool [B], True: that row unconditional). Written here too: diffusion imports no model.
DROP_KEY = "_drop"

# Dropped labels: the conditional network's last class-embedding row (index num_classes).
def null_labels(num_classes: int, batch: int, device: torch.device | str) -> torch.Tensor:
    """Labels that select the unconditional ("null") class of a network with `num_classes`."""
    return torch.full((batch,), num_classes, dtype=torch.long, device=device)


def drop_labels(labels: torch.Tensor, num_classes: int, p_uncond: float,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Condition dropout for training: each label becomes the null class with prob. p_uncond."""
    if p_uncond <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < p_uncond
    return torch.where(drop, torch.full_like(labels, num_classes), labels)


class ClassifierFreeGuidance:
    """`net(x, t, cond)` of a conditional network, guided with `scale`.

    One network call on a doubled batch per evaluation: class labels with the null labels, or
    a condition dict (a network with a conditioner, e.g. text; `dict_conditions`) with its
    second half marked dropped (`DROP_KEY`), which zeroes those rows' conditions as condition
    dropout did in training. A dict holding anything but tensors is guided by two calls, with
    the dict and with None. With `cond=None` the wrapper returns the unconditional prediction
    (nothing to guide).
    """

    def __init__(self, net: Network, num_classes: int | None, scale: float, dict_conditions: bool = False) -> None:
        if not dict_conditions and (num_classes is None or num_classes < 1):
            raise ValueError(
                "classifier-free guidance needs a class-conditional network (model.num_classes=N, "
                "trained with condition dropout); this network is unconditional. Use guidance=none.")
        if scale < 0:
            raise ValueError(f"guidance scale={scale} must be >= 0 (0: unconditional, 1: conditional).")
        self.net, self.num_classes, self.scale = net, num_classes, float(scale)

    def __call__(self, x: torch.Tensor, t: Any, cond: torch.Tensor | dict | None = None) -> torch.Tensor:
        if cond is None or self.scale == 1.0:
            return self.net(x, t, cond)
        t2 = torch.cat([t, t]) if torch.is_tensor(t) and t.ndim == 1 else t
        if isinstance(cond, dict):
            if self.scale == 0.0:
                return self.net(x, t, None)
            if not all(torch.is_tensor(value) for value in cond.values()):
                unconditional = self.net(x, t, None)
                return unconditional + self.scale * (self.net(x, t, cond) - unconditional)
            both = {key: torch.cat([value, value]) for key, value in cond.items()}
            both[DROP_KEY] = torch.arange(2 * x.shape[0], device=x.device) >= x.shape[0]
            conditional, unconditional = self.net(torch.cat([x, x]), t2, both).chunk(2)
            return unconditional + self.scale * (conditional - unconditional)
        if self.num_classes is None:
            raise ValueError("class labels were passed to a network guided on condition dicts")
        if torch.is_tensor(cond) and cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has {cond.shape[0]} labels for a batch of {x.shape[0]} images.")
        null = null_labels(self.num_classes, x.shape[0], x.device)
        if self.scale == 0.0:
            return self.net(x, t, null)
        both = self.net(torch.cat([x, x]), t2, torch.cat([cond, null]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.scale * (conditional - unconditional)
