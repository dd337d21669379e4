"""Settings of retaining-head training: one validated, keyword-only dataclass."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Tuple


@dataclass(kw_only=True, frozen=True)
class TrainConfig:
    """Settings of retaining-head training (defaults: the reference recipe).

    Attributes:
        steps: optimizer steps (one sample each).
        lr, betas, weight_decay: AdamW.
        warmup_steps: linear warm-up from lr/warmup_steps to lr.
        schedule: ``"cosine"`` (from lr down to ``min_lr_ratio · lr`` at the last step)
            or ``"constant"`` after warm-up.
        clip_norm: global gradient-norm clip (over all heads and TP ranks); 0 disables.
        smooth_weight: weight of the neighbour-smoothness term.
        smooth_l1_beta: SmoothL1's switch from quadratic to linear.
        label_norm: ``"standardize"`` (per sample, layer and KV head: zero mean, unit std
            over the prompt tokens) or ``"none"`` (raw logits); see
            :func:`~megatron_apb.training.objective.standardize_labels` for why.
        top_fraction: the fraction of tokens whose overlap is reported (0.1: top-10%).
        hidden: retaining-head width (1024 in the reference).
        eval_every, save_every, log_every: in steps (0: only at the end).
        chunk_size: prompt tokens per label chunk.
        seed: heads' initialisation, data order and the random-score baseline.
    """

    steps: int = 3000
    lr: float = 5e-4
    betas: Tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    clip_norm: float = 0.5
    smooth_weight: float = 0.0025
    smooth_l1_beta: float = 1.0
    label_norm: str = "standardize"
    top_fraction: float = 0.1
    hidden: int = 1024
    eval_every: int = 100
    save_every: int = 0
    log_every: int = 10
    chunk_size: int = 1024
    seed: int = 0

    def __post_init__(self):
        def need(ok, message):
            if not ok:
                raise ValueError(message)

        for name in ("steps", "hidden", "chunk_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                 f"{name} must be an int >= 0 (0 disables it), got {getattr(self, name)!r}")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr must be a positive number, got {self.lr!r} (the reference uses 5e-4)")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), f"betas must be two numbers in [0, 1), got {self.betas!r}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay!r}")
        need(self.schedule in ("cosine", "constant"), f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        need(self.clip_norm >= 0, f"clip_norm must be >= 0 (0 disables clipping), got {self.clip_norm!r}")
        need(self.smooth_weight >= 0, f"smooth_weight must be >= 0, got {self.smooth_weight!r}")
        need(self.smooth_l1_beta > 0, f"smooth_l1_beta must be > 0, got {self.smooth_l1_beta!r}")
        need(self.label_norm in ("standardize", "none"), f"label_norm must be 'standardize' or 'none', got {self.label_norm!r}")
        need(0 < self.top_fraction <= 1, f"top_fraction must lie in (0, 1], got {self.top_fraction!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of update ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps - 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
