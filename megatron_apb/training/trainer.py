"""Fine-tuning retaining heads on a frozen model (Locret's recipe).

Each step takes one sample (batch 1), runs the frozen model once in ``exact`` mode for the
heads' inputs and labels (:mod:`.labels`), and updates only the heads' ``fc1``/``fc2``::

    trainer = RetainingHeadTrainer(model, TrainConfig(steps=3000), log=print)
    history = trainer.fit(train_samples, eval_samples, output_dir="out")

Under TP each rank trains its shard of every head (``fc1``'s partial sums are all-reduced
inside the head, with gradients); under CP each rank scores its block's prompt tokens and
the heads' gradients are summed over the CP group, so the heads stay identical there.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm
import torch.distributed as dist

from ..comm import group_rank, group_size
from ..compress import random_scores
from ..megatron.setup import apb_modules
from .checkpoint import build_retaining_heads, load_training_state, save_training_state
from .config import TrainConfig
from .labels import SampleFeatures, sample_features
from .objective import all_reduce_sum, block_counts, gather_rows, retaining_loss, standardize_labels, top_overlap

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- trainer
class RetainingHeadTrainer:
    """Trains retaining heads for a frozen GPTModel with the APB layer spec.

    ``model``: built on this rank's TP x CP place (its APB modules carry the groups), in its
    inference dtype; every parameter is frozen here.  The heads are float32 (master
    weights); on CUDA with a bf16 model their forward runs under bf16 autocast.
    ``log``: called with progress lines on the first rank of the TP x CP grid (None:
    silent); ``progress``: show a tqdm bar there.
    """

    def __init__(self, model, config: TrainConfig, *, log: Optional[Callable[[str], None]] = None, progress: bool = False, pad_id: int = 0):
        modules = apb_modules(model)
        if not modules:
            raise ValueError("the model has no APB attention modules; build it with the APB layer spec")
        self.model, self.config, self.pad_id = model.eval(), config, pad_id
        for p in model.parameters():
            p.requires_grad_(False)
        self.tp_group, self.cp_group = modules[0].tp_group, modules[0].cp_group
        # the first rank of this model's TP x CP grid logs and writes files
        self.is_main = group_rank(self.tp_group) == 0 and group_rank(self.cp_group) == 0
        self.log = log if self.is_main else None
        self.progress = progress and self.is_main
        self.heads = build_retaining_heads(model, hidden=config.hidden, seed=config.seed)
        self.total_heads = modules[0].num_kv_heads * group_size(self.tp_group)
        self.optimizer = torch.optim.AdamW(
            self.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, foreach=False,
        )
        self.step = 0
        self.history = {"train": [], "eval": []}
        param = next(model.parameters())
        self.autocast = param.device.type == "cuda" and param.dtype in (torch.bfloat16, torch.float16)
        self.autocast_dtype = param.dtype

    def parameters(self):
        return [p for h in self.heads for p in (h.fc1.weight, h.fc2.weight)]

    def _say(self, message):
        if self.log is not None:
            self.log(message)

    # -------------------------------------------------------------------- one sample
    def features(self, sample) -> SampleFeatures:
        """Inputs and labels of ``sample`` (prompt_ids, answer_ids) for this rank."""
        return sample_features(self.model, sample.prompt_ids, sample.answer_ids, chunk_size=self.config.chunk_size, pad_id=self.pad_id)

    def predict(self, feats: SampleFeatures) -> Tensor:
        """Scores [layers, n, kv] of this rank's tokens (float32, with gradients)."""
        with torch.autocast(self.model_device_type, dtype=self.autocast_dtype, enabled=self.autocast):
            return torch.stack([head(q, k, v)[0] for head, q, k, v in zip(self.heads, feats.q, feats.k, feats.v)])

    @property
    def model_device_type(self) -> str:
        return next(self.model.parameters()).device.type

    def _loss(self, pred, feats):
        counts = block_counts(feats.prompt_len, feats.block_len, group_size(self.cp_group))
        labels = feats.labels
        if self.config.label_norm == "standardize":
            labels = standardize_labels(labels, self.cp_group)
        loss, _, _ = retaining_loss(
            pred, labels, prompt_len=feats.prompt_len, total_heads=self.total_heads, counts=counts,
            group=self.cp_group, smooth_weight=self.config.smooth_weight, beta=self.config.smooth_l1_beta,
        )
        return loss, labels, counts

    def _overlap(self, pred, labels, counts) -> float:
        whole = lambda x: torch.cat(gather_rows(x, counts, self.cp_group), dim=1)  # noqa: E731
        hits, pairs = top_overlap(whole(pred), whole(labels), self.config.top_fraction)
        total = all_reduce_sum(torch.stack([hits, torch.tensor(float(pairs), dtype=torch.float64, device=hits.device)]), self.tp_group)
        return float(total[0] / total[1])

    def _global(self, x: Tensor) -> float:
        return float(all_reduce_sum(all_reduce_sum(x.detach().double().reshape(1), self.tp_group), self.cp_group))

    def train_step(self, sample) -> dict:
        """One optimizer step on ``sample``; returns the step's record (global numbers)."""
        feats = self.features(sample)
        pred = self.predict(feats)
        loss, labels, counts = self._loss(pred, feats)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = self.parameters()
        for p in params:  # heads are replicated over CP: sum the ranks' gradients
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad = all_reduce_sum(p.grad, self.cp_group)
        sq = torch.stack([p.grad.double().pow(2).sum() for p in params]).sum()
        norm = math.sqrt(float(all_reduce_sum(sq.reshape(1), self.tp_group)))  # heads are sharded over TP
        if self.config.clip_norm > 0 and norm > self.config.clip_norm:
            for p in params:
                p.grad.mul_(self.config.clip_norm / (norm + 1e-6))
        lr = self.config.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        record = dict(step=self.step + 1, loss=self._global(loss), overlap=self._overlap(pred, labels, counts),
                      lr=lr, grad_norm=norm, tokens=feats.prompt_len)
        self.step += 1
        self.history["train"].append(record)
        return record

    @torch.no_grad()
    def evaluate(self, samples, *, scorer: str = "heads") -> dict:
        """Mean loss and top-fraction overlap on ``samples``.

        ``scorer``: ``"heads"`` (the heads being trained) or ``"random"`` (uniform random
        scores, the chance baseline; its loss is reported as None).
        """
        if scorer not in ("heads", "random"):
            raise ValueError(f"scorer must be 'heads' or 'random', got {scorer!r}")
        losses, overlaps = [], []
        for i, sample in enumerate(samples):
            feats = self.features(sample)
            if scorer == "heads":
                pred = self.predict(feats).float()
            else:
                layers, n, kv = feats.labels.shape
                seed = self.config.seed * 1000003 + 7919 * i + 104729 * group_rank(self.cp_group) + 31 * group_rank(self.tp_group)
                pred = random_scores(layers, n, kv, seed=seed, device=feats.labels.device)
            loss, labels, counts = self._loss(pred, feats)
            losses.append(self._global(loss))
            overlaps.append(self._overlap(pred, labels, counts))
        return dict(loss=sum(losses) / len(losses) if scorer == "heads" else None,
                    overlap=sum(overlaps) / len(overlaps))

    # ---------------------------------------------------------------------- the loop
    def sample_index(self, step: int, num_samples: int) -> int:
        """The training sample of update ``step``: a seeded permutation per epoch, so a
        resumed run sees the same order."""
        epoch, within = divmod(step, num_samples)
        order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.config.seed * 65537 + epoch))
        return int(order[within])

    def fit(self, train: Sequence, eval_samples: Sequence = (), *, output_dir: Optional[str] = None,
            until: Optional[int] = None) -> dict:
        """Train up to ``config.steps`` (from the current step, e.g. after :meth:`resume`),
        evaluating on ``eval_samples`` every ``eval_every`` steps and at the end, saving to
        ``output_dir`` every ``save_every`` steps and at the end.  ``until`` stops earlier
        (at that step, saving there) without changing the schedule, as an interruption
        would.  Returns the history."""
        cfg = self.config
        stop = cfg.steps if until is None else min(until, cfg.steps)
        if not train:
            raise ValueError("no training samples")
        if self.step == 0 and eval_samples and not self.history["eval"]:
            self._eval(eval_samples)
        bar = None
        if self.progress:
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train-heads", unit="step", dynamic_ncols=True)
        start, first = time.perf_counter(), self.step
        try:
            while self.step < stop:
                record = self.train_step(train[self.sample_index(self.step, len(train))])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", overlap=f"{record['overlap']:.3f}")
                if cfg.log_every and (self.step % cfg.log_every == 0 or self.step == 1) and bar is None:
                    self._say(f"step {self.step}/{cfg.steps}: loss {record['loss']:.4f}, top-{cfg.top_fraction:.0%} "
                              f"overlap {record['overlap']:.3f}, lr {record['lr']:.2e}, grad norm {record['grad_norm']:.3f}, "
                              f"{(time.perf_counter() - start) / (self.step - first):.2f} s/step")
                last = self.step == stop
                if eval_samples and (last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
                    self._eval(eval_samples)
                if output_dir and (last or (cfg.save_every and self.step % cfg.save_every == 0)):
                    self.save(output_dir)
        finally:
            if bar is not None:
                bar.close()
        return self.history

    def _eval(self, samples):
        result = dict(step=self.step, **self.evaluate(samples))
        self.history["eval"].append(result)
        self._say(f"eval at step {self.step}: loss {result['loss']:.4f}, top-{self.config.top_fraction:.0%} "
                  f"overlap {result['overlap']:.3f} on {len(samples)} held-out prompts")
        return result

    # ------------------------------------------------------------------ checkpoints
    def _report(self, message: str) -> None:
        """Where checkpoint housekeeping is reported: the log (first rank), else a warning."""
        if self.log is not None:
            self.log(f"checkpoint: {message}")
        elif self.is_main:
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def save(self, directory: str) -> None:
        """Heads (reference layout, full), optimizer moments, step and history (collective
        over TP; the first rank writes).  The directory is replaced whole: a save killed
        midway leaves the previous checkpoint, and the next save or resume cleans up."""
        save_training_state(directory, self.heads, self.optimizer, step=self.step, config=self.config.to_dict(),
                            history=self.history, write=self.is_main, report=self._report)
        for group in (self.tp_group, self.cp_group):  # the files exist before any rank reads them
            if group_size(group) > 1:
                dist.barrier(group=group)

    def resume(self, directory: str) -> int:
        """Continue from :meth:`save`'s files; returns the step reached.  The configuration
        may differ (e.g. more ``steps``) except for ``hidden``.  A checkpoint whose parts
        come from different steps, or a damaged one, raises
        :class:`~megatron_apb.errors.CheckpointError` naming the files."""
        meta = load_training_state(directory, self.heads, self.optimizer, report=self._report)
        self.step = int(meta["step"])
        self.history = meta["history"]
        if self.step > self.config.steps:
            raise ValueError(f"{directory} is at step {self.step}, beyond steps={self.config.steps}; raise --steps")
        return self.step
