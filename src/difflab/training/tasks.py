"""Tasks: the condition inputs of a batch, built from its clean images (and labels).

A task turns a batch into the dict a ``models.conditioning.Conditioner`` reads, in
training (from the batch) and at sampling (from a measurement y, or a prompt):

- ``SuperResolution`` (SR3, Saharia et al. 2021): ``low_res``, the image average-pooled by
  ``factor`` and brought back to full size (bicubic, or nearest), concatenated to x_t;
- ``Inpainting`` (Palette, Saharia et al. 2022): ``keep`` (1 on known pixels) and ``masked``
  (the image with the hole at 0), one random mask per image from a fixed bank of the named
  masks, so a batch mixes centre boxes, half planes and brush strokes;
- ``TextToImage``: ``text``, the word ids of a caption made from each image's label with a
  training template drawn anew each time (``data.captions``); prompts at sampling.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from difflab.data.captions import Captions, WordTokenizer
from difflab.diffusion.degradation import MASKS, Downsample, Inpaint, make_keep

TASK_METHODS = {"superres": "sr3", "inpaint": "palette"}


class SuperResolution:
    """Condition ``{input_key: upsampled low-res}`` for an SR3-style model."""

    kind = "superres"

    def __init__(self, factor: int = 4, upsample: str = "bicubic", input_key: str = "low_res") -> None:
        if upsample not in ("bicubic", "nearest"):
            raise ValueError(f"upsample={upsample!r} must be bicubic or nearest")
        self.operator = Downsample(factor)
        self.factor, self.upsample, self.input_key = factor, upsample, input_key

    def from_measurement(self, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """The condition for low-res images ``y`` [B, C, H / factor, W / factor]."""
        if self.upsample == "nearest":
            up = self.operator.A_pinv(y)
        else:
            size = (y.shape[-2] * self.factor, y.shape[-1] * self.factor)
            up = F.interpolate(y, size=size, mode="bicubic", align_corners=False).clamp(-1, 1)
        return {self.input_key: up}

    def inputs(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        return self.from_measurement(self.operator.A(images))

    def seen(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """What the model sees, as an image (for grids)."""
        return cond[self.input_key]

    def __repr__(self) -> str:
        return f"SuperResolution(x{self.factor}, {self.upsample})"


class Inpainting:
    """Condition ``{"keep": 0/1 [B, 1, H, W], "masked": image with the hole at 0}`` (Palette)."""

    kind = "inpaint"

    def __init__(self, image_size: int = 28, masks: tuple[str, ...] = ("center", "top", "bottom", "left", "right",
                                                                       "strokes"),
                 bank: int = 256, seed: int = 0) -> None:
        unknown = [m for m in masks if m not in MASKS]
        if unknown or not masks:
            raise ValueError(f"masks={list(masks)}: each must be one of {', '.join(MASKS)}")
        generator = torch.Generator().manual_seed(seed)
        # A fixed bank: strokes vary within it, the named masks repeat. Drawn once, not per step.
        kinds = [masks[i % len(masks)] for i in range(bank)]
        self.bank = torch.stack([make_keep(kind, image_size, generator=generator) for kind in kinds])
        self.masks, self.image_size = tuple(masks), image_size

    def from_measurement(self, y: torch.Tensor, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """The condition for images ``y`` whose pixels are known where ``keep`` [H, W] or [B, 1, H, W]."""
        keep = Inpaint(keep).keep.to(y.device).expand(y.shape[0], 1, *y.shape[-2:])
        masked = torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return {"keep": keep.to(y.dtype), "masked": masked}

    def inputs(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        if images.shape[-1] != self.image_size:
            raise ValueError(f"the task's masks are {self.image_size}x{self.image_size}, the images "
                             f"{images.shape[-2]}x{images.shape[-1]}: set task.image_size")
        pick = torch.randint(len(self.bank), (images.shape[0],), generator=generator,
                             device=generator.device if generator is not None else "cpu")
        keep = self.bank[pick.cpu()][:, None].to(images.device)
        return self.from_measurement(images, keep)

    def seen(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return cond["masked"]

    def __repr__(self) -> str:
        return f"Inpainting({', '.join(self.masks)})"


class TextToImage:
    """Condition ``{input_key: word ids [B, L]}`` of one caption per image (text-to-image).

    ``class_names``: the data's classes (difflab-train fills them in from the data, so the
    run config rebuilds the vocabulary); ``max_length``: the longest caption in words;
    ``captions``: ``templates`` (sentences) or ``class_word`` (the class word alone, see
    ``data.captions``).
    """

    kind = "text"

    def __init__(self, class_names: Optional[list[str]] = None, max_length: int = 16, input_key: str = "text",
                 captions: str = "templates") -> None:
        if not class_names:
            raise ValueError("TextToImage needs the data's class_names (difflab-train fills them in from the data)")
        self.captions = Captions(class_names, style=captions)
        self.tokenizer = WordTokenizer(self.captions.vocabulary(), max_length)
        self.class_names, self.input_key = list(class_names), input_key
        # Every training caption tokenized once, [classes, templates, L]: a batch's captions are then
        # two index lookups on its own device, with no strings and no host round trip per step.
        templates = self.captions.train_templates
        texts = [self.captions.caption(k, t) for k in range(self.num_classes) for t in templates]
        self.table = self.tokenizer(texts).view(self.num_classes, len(templates), -1)

    @property
    def num_classes(self) -> int:
        return self.captions.num_classes

    def from_prompts(self, prompts: list[str], device: torch.device | str = "cpu", warn: bool = False
                     ) -> dict[str, torch.Tensor]:
        """The condition for free-text prompts (unknown words warned about with `warn`)."""
        return {self.input_key: self.tokenizer(prompts, warn=warn).to(device)}

    def conditions_for(self, labels: torch.Tensor, split: str = "train",
                       generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Captions of `labels` from the `split` templates (train | held_out), as ids."""
        generator = generator or torch.Generator().manual_seed(0)
        return self.from_prompts(self.captions.sample(labels.cpu(), split, generator), labels.device)

    def inputs(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
               labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        if labels is None:
            raise ValueError("TextToImage captions images from their labels: the batch has none")
        device = generator.device if generator is not None else labels.device
        picks = torch.randint(self.table.shape[1], labels.shape, generator=generator, device=device)
        if self.table.device != labels.device:
            self.table = self.table.to(labels.device)
        return {self.input_key: self.table[labels, picks.to(labels.device)]}

    def __repr__(self) -> str:
        return f"TextToImage({self.captions.num_classes} classes, {self.tokenizer.vocab_size} words)"


def probe_conditions(task: SuperResolution | Inpainting | TextToImage | None, num_classes: Optional[int],
                     shape: tuple[int, ...]) -> object:
    """Conditions shaped like the ones a run feeds its network (the task's dict, class labels
    or None), for the precision probes of training and sampling."""
    if task is not None:
        labels = torch.arange(shape[0]) % getattr(task, "num_classes", 1)
        return task.inputs(torch.rand(shape) * 2 - 1, torch.Generator().manual_seed(0), labels=labels)
    return None if num_classes is None else torch.arange(shape[0]) % num_classes


class TrainedRestoration:
    """Restoration by a model trained for it (``sr3`` or ``palette``), with the interface of
    ``diffusion.restoration.Restoration``: the sampler runs once, conditioned on the task's
    inputs built from the measurement. Inpainting pastes the known pixels back at the end, as
    Palette does, so they come out bit-identical; super-resolution is left as sampled (its
    consistency with y is measured, not imposed).

    ``regression``: a network trained only at t = T-1 with the x0 objective (``objective=x0
    density=last``) is a plain MSE regression from the condition; its restoration is one
    x0 prediction from noise at T-1, whatever the sampler.
    """

    def __init__(self, task: SuperResolution | Inpainting, regression: bool = False) -> None:
        self.task, self.regression = task, regression
        self.method = "regression" if regression else TASK_METHODS[task.kind]

    def path(self, n: int) -> list[int]:
        return list(range(n + 1))

    def network_calls(self, n: int, calls_per_step: int = 1) -> int:
        return 1 if self.regression else n * calls_per_step

    @torch.no_grad()
    def restore(self, denoiser, schedule, sampler, operator, y: torch.Tensor, shape: tuple[int, ...], *,
                cond=None, generator: Optional[torch.Generator] = None, x_T: Optional[torch.Tensor] = None,
                progress: bool = False) -> torch.Tensor:
        y = y.to(schedule.device)
        if isinstance(self.task, SuperResolution):
            if not isinstance(operator, Downsample) or operator.factor != self.task.factor:
                raise ValueError(f"this SR3 model was trained for x{self.task.factor} super-resolution; "
                                 f"got {operator!r}: set factor={self.task.factor}")
            inputs = self.task.from_measurement(y)
        else:
            if not isinstance(operator, Inpaint):
                raise ValueError(f"this Palette model inpaints; got {operator!r}")
            inputs = self.task.from_measurement(operator.A_pinv(y), operator.keep)
        if self.regression:
            noise = x_T if x_T is not None else torch.randn(shape, generator=generator, device=schedule.device)
            out = denoiser.x0(noise.to(schedule.device), schedule.num_timesteps - 1, inputs, clip=True)
        else:
            start = {"x_T": x_T} if x_T is not None else {"shape": shape}
            out = sampler.sample(denoiser, schedule, cond=inputs, generator=generator, progress=progress, **start)
        return operator.project(out, y) if isinstance(self.task, Inpainting) else out

