"""One decoding step with static buffers, captured in a CUDA graph where it can be.

A phase-2 step after a long prefill does little GPU work per layer (a few small matmuls
and one pass over the cache), so launching it from Python costs more than running it.
:class:`DecodeStep` runs the same step as :meth:`APBEngine.step
<megatron_apb.inference.APBEngine.step>` for one new token, with everything the step reads
held in fixed device buffers:

* the token id and its position (filled before each step, no host read in the step);
* the KV cache's storage, allocated once for prompt + answer (no growth copies), its
  length and write row on the device (:meth:`CPKVCache.set_tokens
  <megatron_apb.inference.cache.CPKVCache.set_tokens>`);
* the rotary table, long enough for the last position.

The forward is a ``static`` :class:`~megatron_apb.forward.ForwardContext`: RoPE rows
gathered on the device, the new K/V written in place, attention over the device length
by the split-KV kernel (:func:`~megatron_apb.parallel.decode.decode_attention`).  On CUDA
without a collective in the step (one CP rank, or a gathered cache, and TP 1) the whole
step (every layer, the logits, the NaN check) is captured once in a CUDA graph and then
replayed: a token costs one graph launch and the one host read of the sampled token.
Elsewhere (CPU, CP or TP collectives in the step) the same static forward runs eagerly.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..comm import group_size
from ..errors import APBConfigError
from ..forward import ForwardContext

Tensor = torch.Tensor

NONFINITE_LOGITS = (
    "the model produced NaN/inf logits; check the checkpoint and the dtype (bf16/fp16 overflow) "
    "and that every rank loaded the same weights"
)


def graphs_possible(device: torch.device, *groups) -> bool:
    """Whether a decoding step on ``device`` with these process groups can be captured:
    CUDA, and no collective inside the step (every group has one rank)."""
    return device.type == "cuda" and all(group_size(g) == 1 for g in groups)


class DecodeStep:
    """Decoding steps of one new token each, on a cache prefilled with room for them.

    Args:
        engine: the :class:`~megatron_apb.inference.APBEngine` (its adapter and config).
        cache: this rank's :class:`~megatron_apb.inference.cache.CPKVCache`, prefilled
            (and, on the owner, holding the query's K/V).
        last_position: the largest position a step will be asked for.
        graph: capture the step in a CUDA graph (default: where :func:`graphs_possible`).

    ``step(token, position)`` returns ``(logits, finite)``: float logits [vocab] and a
    device bool, whether they are all finite.  The buffers are reused: read the logits
    before the next step.

    With a :class:`~megatron_apb.inference.cache.BatchedKVCache` of ``batch`` sequences,
    ``step(tokens, positions)`` takes one token and position per sequence (sequences, or
    device tensors) and returns logits [batch, vocab].
    """

    def __init__(self, engine, cache, *, last_position: int, graph: Optional[bool] = None, groups=(),
                 batch: int = 1):
        self.engine, self.cache = engine, cache
        device = engine.device
        if graph is None:
            graph = graphs_possible(device, *groups)
        elif graph and device.type != "cuda":
            raise APBConfigError(f"CUDA graphs need a CUDA device; the model is on {device}")
        self.graph_enabled = graph
        self.batch = batch
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.table = engine._rotary_table(last_position + 1)
        self.last_position = last_position
        self._graph = None
        self._out: Optional[Tuple[Tensor, Tensor]] = None

    def _run(self) -> Tuple[Tensor, Tensor]:
        """The step on the current buffers: no host value is read."""
        engine = self.engine
        context = ForwardContext.decode(self.positions, self.cache, config=engine.config, static=True)
        context.rotary_table = self.table
        hidden = engine.adapter.run_layers(engine.adapter.embed(self.ids[:, None]), context)
        logits = engine.adapter.logits(hidden[-1:])[:, : engine.vocab_size]  # [batch, vocab]
        if self.batch == 1:
            logits = logits[0]
        return logits, torch.isfinite(logits).all()

    def _capture(self) -> None:
        # warm up on a side stream (lazy initialisation, compilation, autotuning), then
        # capture; both runs repeat this step exactly (same token, same cache row)
        stream = torch.cuda.Stream(device=self.engine.device)
        stream.wait_stream(torch.cuda.current_stream(self.engine.device))
        with torch.cuda.stream(stream):
            self._run()
        torch.cuda.current_stream(self.engine.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._run()
        self._graph, self._out = graph, out

    @torch.no_grad()
    def step(self, token, position) -> Tuple[Tensor, Tensor]:
        """Run the model on ``token`` at ``position`` (one per sequence for a batch); the
        owner's cache grows by it."""
        top = int(position) if isinstance(position, int) else max(int(p) for p in position)
        if top > self.last_position:
            raise APBConfigError(
                f"position {top} is beyond the {self.last_position} this decoding step was "
                "prepared for; make a new DecodeStep with a larger last_position"
            )
        self.cache.advance()
        for buf, value in ((self.ids, token), (self.positions, position)):
            if isinstance(value, int):
                buf.fill_(value)
            else:
                buf.copy_(torch.as_tensor(value, dtype=torch.long).reshape(-1), non_blocking=True)
        if not self.graph_enabled:
            return self._run()
        if self._graph is None:
            self._capture()
        self._graph.replay()
        return self._out
