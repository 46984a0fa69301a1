"""Mixup and CutMix with label smoothing: one of none / mixup / cutmix per batch, on soft targets."""

import torch
import torch.nn.functional as F


def smooth_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((targets.shape[0], num_classes), off, device=targets.device).scatter_(
        1, targets.unsqueeze(1), 1.0 - smoothing + off
    )


class MixupCutmix:
    """Batch-level mixing with the partner ``batch.flip(0)``.

    Each batch picks, with equal probability, one of: no mixing, mixup (``alpha`` = ``mixup_alpha``), cutmix
    (``cutmix_alpha``); a method whose alpha is 0 is not offered. Randomness comes from the global torch
    generator, which checkpoints save and restore.
    """

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, label_smoothing: float) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.choices = ["none"] + [name for name, a in (("mixup", mixup_alpha), ("cutmix", cutmix_alpha)) if a > 0]
        self.alphas = {"mixup": mixup_alpha, "cutmix": cutmix_alpha}

    @property
    def enabled(self) -> bool:
        return len(self.choices) > 1

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        soft = smooth_one_hot(targets, self.num_classes, self.label_smoothing)
        choice = self.choices[int(torch.randint(len(self.choices), ()).item())]
        if choice == "none":
            return (images, soft)

        alpha = self.alphas[choice]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if choice == "mixup":
            images = images * lam + images.flip(0) * (1.0 - lam)
        else:
            (images, lam) = _paste_box(images, lam)

        return (images, soft * lam + soft.flip(0) * (1.0 - lam))


def _paste_box(images: torch.Tensor, lam: float) -> tuple[torch.Tensor, float]:
    """CutMix: paste a box covering about ``1 - lam`` of the partner image; returns the exact kept fraction."""
    (height, width) = images.shape[-2:]
    cut = (1.0 - lam) ** 0.5
    (box_h, box_w) = (int(height * cut), int(width * cut))
    cy = int(torch.randint(height, ()).item())
    cx = int(torch.randint(width, ()).item())
    (top, bottom) = (max(cy - box_h // 2, 0), min(cy + box_h // 2, height))
    (left, right) = (max(cx - box_w // 2, 0), min(cx + box_w // 2, width))
    images = images.clone()
    images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    return (images, 1.0 - (bottom - top) * (right - left) / (height * width))


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-soft_targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
