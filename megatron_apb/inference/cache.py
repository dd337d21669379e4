"""The per-rank KV cache of distributed generation.

After the APB prefill each CP rank keeps the post-RoPE K and V of its own document block
only (never the anchor, never the passing block), without the padding that ends the last
block.  During phase 2 one rank, the *owner* (the last), also appends the K and V of the
query and generated tokens.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..errors import APBConfigError

Tensor = torch.Tensor


class CPKVCache:
    """K/V per layer for this rank: ``get(layer)`` gives [batch, tokens, kv_heads, head_dim].

    Phase-2 tokens are written in place into storage that grows geometrically, so a decoding
    step copies only the new token's K/V (not the whole cache); ``get`` returns views.

    For a captured decoding step (:class:`~megatron_apb.inference.decode.DecodeStep`) the
    storage is static instead: :meth:`set_tokens` sets the length on the host and in a
    device tensor (:attr:`lengths`, with the write position :attr:`slots`), and
    :meth:`write` copies the new K/V at the device position, so a step reads no host value
    and the storage never moves.  ``reserve`` is then the exact room (query +
    ``max_new_tokens``), checked by :meth:`check_room`.

    Args:
        valid_len: document tokens of this rank's block that are real (not padding).
        owner: whether this rank appends the K/V of phase-2 tokens.
        reserve: phase-2 tokens the owner makes room for at the prefill (the storage grows
            beyond it when needed).
        complete: the cache holds every rank's block (gathered after the prefill): phase 2
            then runs on this rank alone, with no collective per layer.
        prefill_counts: the prefill compresses the caches (SnapKV): the tokens each CP
            rank keeps per layer (``valid_len`` is this rank's); the prefill must store
            exactly that many rows.  None: every rank keeps its whole block.
    """

    def __init__(self, valid_len: int, owner: bool, reserve: int = 256, complete: bool = False,
                 prefill_counts=None):
        if valid_len < 0:
            raise ValueError(f"valid_len must be >= 0, got {valid_len}")
        if reserve < 0:
            raise ValueError(f"reserve must be >= 0, got {reserve}")
        if complete and not owner:
            raise ValueError("a complete cache appends phase-2 tokens itself: owner must be True")
        self.valid_len, self.owner, self.reserve, self.complete = valid_len, owner, reserve, complete
        self.prefill_counts = None if prefill_counts is None else tuple(prefill_counts)
        self._keys: Dict[int, Tensor] = {}
        self._values: Dict[int, Tensor] = {}
        self._length: Dict[int, int] = {}
        #: device copies of the length (int32 [batch]) and of the write position (int64 [1])
        self.lengths: Optional[Tensor] = None
        self.slots: Optional[Tensor] = None

    def store_prefill(self, layer: int, k: Tensor, v: Tensor):
        """Keep the block rows of a prefill (padding dropped)."""
        if self.prefill_counts is not None and k.shape[1] != self.valid_len:
            raise RuntimeError(
                f"this cache expects the {self.valid_len} rows the KV compression keeps, got "
                f"{k.shape[1]}: the model's attention did not compress (kv_compress needs the "
                "APB core attention)")
        n = min(self.valid_len, k.shape[1])
        room = n + (self.reserve if self.owner else 0)
        for store, x in ((self._keys, k), (self._values, v)):
            buf = x.new_empty((x.shape[0], room) + tuple(x.shape[2:]))
            buf[:, :n] = x[:, :n]
            store[layer] = buf
        self._length[layer] = n

    def append(self, layer: int, k: Tensor, v: Tensor):
        """Append phase-2 tokens (owner only)."""
        if not self.owner:
            raise RuntimeError("only the owner rank appends phase-2 tokens to its cache")
        if layer not in self._keys:
            raise KeyError(f"no cached K/V for layer {layer}: run the prefill first")
        n, m = self._length[layer], k.shape[1]
        if n + m > self._keys[layer].shape[1]:  # grow by half (amortized O(1) per token)
            room = max(n + m, n + n // 2, n + self.reserve)
            for store in (self._keys, self._values):
                old = store[layer]
                buf = old.new_empty((old.shape[0], room) + tuple(old.shape[2:]))
                buf[:, :n] = old[:, :n]
                store[layer] = buf
        self._keys[layer][:, n : n + m] = k
        self._values[layer][:, n : n + m] = v
        self._length[layer] = n + m

    # ------------------------------------------------------------- static storage
    def capacity(self) -> int:
        """Rows the storage holds per layer without growing."""
        return min(k.shape[1] for k in self._keys.values()) if self._keys else 0

    def check_room(self, tokens: int) -> None:
        """Refuse (naming the fix) a phase 2 that would need more than :meth:`capacity` rows."""
        need = self.tokens() + tokens
        if self.owner and need > self.capacity():
            raise APBConfigError(
                f"the KV cache holds {self.capacity()} tokens on this rank but the query and the "
                f"answer need {need}: lower max_new_tokens, or prefill with a larger reserve "
                "(APBEngine.prefill(..., reserve=query + max_new_tokens))"
            )

    def set_tokens(self, n: int) -> None:
        """The owner's cache holds ``n`` tokens per layer (the new ones included), on the
        host and in :attr:`lengths` / :attr:`slots` (device; the step's new token goes to row
        ``n - 1``).  Launches two fills, reads nothing back."""
        if not self._keys:
            raise KeyError("no cached K/V: run the prefill first")
        if self.owner:
            if n > self.capacity():
                self.check_room(n - self.tokens())
            for layer in self._length:
                self._length[layer] = n
        if self.lengths is None:
            any_k = next(iter(self._keys.values()))
            self.lengths = torch.zeros(any_k.shape[0], dtype=torch.int32, device=any_k.device)
            self.slots = torch.zeros(1, dtype=torch.long, device=any_k.device)
        self.lengths.fill_(self.tokens())
        self.slots.fill_(max(0, self.tokens() - 1))

    def advance(self) -> None:
        """Make room for one more decoded token (the owner's length grows by one)."""
        self.set_tokens(self.tokens() + 1 if self.owner else self.tokens())

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Write one new token's K/V [batch, 1, kv_heads, d] at row :attr:`slots` (device)."""
        if not self.owner:
            raise RuntimeError("only the owner rank writes phase-2 tokens to its cache")
        self._keys[layer].index_copy_(1, self.slots, k)
        self._values[layer].index_copy_(1, self.slots, v)

    def buffers(self, layer: int) -> Tuple[Tensor, Tensor]:
        """The whole K and V storage of ``layer`` (rows past :attr:`lengths` are not valid)."""
        if layer not in self._keys:
            raise KeyError(f"no cached K/V for layer {layer}: run the prefill first")
        return self._keys[layer], self._values[layer]

    def release(self, layer: int) -> None:
        """Drop ``layer``'s K/V (its storage is freed once no view holds it)."""
        self._keys.pop(layer, None), self._values.pop(layer, None), self._length.pop(layer, None)

    def get(self, layer: int) -> Tuple[Tensor, Tensor]:
        """Views of the cached K and V of ``layer``."""
        if layer not in self._keys:
            raise KeyError(f"no cached K/V for layer {layer}: run the prefill first")
        n = self._length[layer]
        return self._keys[layer][:, :n], self._values[layer][:, :n]

    def layers(self):
        """The layer numbers cached."""
        return list(self._keys)

    def tokens(self) -> int:
        """Tokens cached per layer on this rank."""
        return next(iter(self._length.values())) if self._length else 0


class BatchedKVCache:
    """The complete caches of several sequences in one static storage, for decoding them
    together: K/V per layer [batch, capacity, kv_heads, d], the length of each sequence in
    :attr:`lengths` (device int32 [batch]) and its write row in :attr:`slots` (device int64
    [batch]).  Made from complete single-sequence caches (CP 1, or gathered), which it
    takes over: each layer is copied, then released from them (the peak is the batch plus
    one layer); ``room``: decoded tokens each sequence may add.

    :meth:`advance` lengthens every sequence by one token on the device (no host read);
    :meth:`write` puts each sequence's new K/V at its own row.
    """

    owner = True
    complete = True

    def __init__(self, caches, room: int):
        caches = list(caches)
        if not caches:
            raise ValueError("BatchedKVCache needs at least one cache")
        if not all(c.complete for c in caches):
            raise ValueError("BatchedKVCache takes complete caches (one CP rank, or gathered)")
        if room < 0:
            raise ValueError(f"room must be >= 0, got {room}")
        layers = caches[0].layers()
        self.host_lengths = [c.tokens() for c in caches]
        capacity = max(self.host_lengths) + room
        self._keys: Dict[int, Tensor] = {}
        self._values: Dict[int, Tensor] = {}
        for layer in layers:
            for store, part in ((self._keys, 0), (self._values, 1)):
                first = caches[0].get(layer)[part]
                buf = first.new_zeros((len(caches), capacity) + tuple(first.shape[2:]))
                for i, cache in enumerate(caches):
                    x = cache.get(layer)[part]
                    buf[i, : x.shape[1]] = x[0]
                store[layer] = buf
            for cache in caches:
                cache.release(layer)
        device = next(iter(self._keys.values())).device
        self.lengths = torch.tensor(self.host_lengths, dtype=torch.int32, device=device)
        self.slots = (self.lengths.long() - 1).clamp_(min=0)
        self._rows = torch.arange(len(caches), device=device)
        self.capacity = capacity

    def layers(self):
        return list(self._keys)

    def tokens(self) -> int:
        """The longest sequence's length."""
        return max(self.host_lengths)

    def advance(self) -> None:
        """Every sequence grows by one token (device lengths and write rows; host copy)."""
        if self.tokens() + 1 > self.capacity:
            raise APBConfigError(
                f"the batched KV cache holds {self.capacity} tokens per sequence; lower max_new_tokens"
            )
        self.host_lengths = [n + 1 for n in self.host_lengths]
        self.lengths.add_(1)
        self.slots.copy_(self.lengths).sub_(1)

    def write(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Each sequence's new K/V [batch, 1, kv_heads, d] at its own row :attr:`slots`."""
        self._keys[layer].index_put_((self._rows, self.slots), k[:, 0])
        self._values[layer].index_put_((self._rows, self.slots), v[:, 0])

    def buffers(self, layer: int) -> Tuple[Tensor, Tensor]:
        return self._keys[layer], self._values[layer]

    def get(self, layer: int) -> Tuple[Tensor, Tensor]:
        raise RuntimeError("a batched cache is read through buffers() and lengths (static decoding only)")
