"""The key/value cache of the dynamic decoding path: a ``transformers`` cache over preallocated buffers.

``DynamicLayer`` concatenates the whole cache at every step; ``GrowingLayer`` writes each step in place
and doubles its buffer when it runs out of room. It also places a row's prefill right-aligned into a
batch cache (``place``), joins left-padded caches into one (``join_left_padded``: rows that join a running
batch, decoding/running.py) and reorders rows for beam search.
The static path for accelerators is static_decode.py.
"""
import torch
from transformers.cache_utils import Cache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A key/value cache layer over a preallocated buffer: appending a step writes in place
    (``DynamicLayer`` concatenates the whole cache every step).

    Args:
        reserve (int): columns allocated beyond the first update (the buffer doubles when full)
    """

    def __init__(self, reserve: int = 64):
        super().__init__()
        self.reserve = max(1, int(reserve))
        self._k = self._v = None
        self._n = 0

    def _views(self):
        self.keys, self.values = self._k[:, :, : self._n], self._v[:, :, : self._n]

    def _alloc(self, like: torch.Tensor, batch: int, capacity: int):
        shape = (batch, like.shape[1], capacity, like.shape[3])
        self._k = like.new_zeros(shape)
        self._v = like.new_zeros(shape)
        self.device, self.is_initialized = like.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        """Append a step's keys and values (B, Hkv, n, hd); returns the layer's (keys, values) so far."""
        n = key_states.shape[-2]
        if self._k is None:
            self._alloc(key_states, key_states.shape[0], n + self.reserve)
        elif self._n + n > self._k.shape[2]:  # out of room: double
            k, v = self._k, self._v
            self._alloc(key_states, k.shape[0], 2 * (self._n + n))
            self._k[:, :, : self._n], self._v[:, :, : self._n] = k[:, :, : self._n], v[:, :, : self._n]
        self._k[:, :, self._n: self._n + n] = key_states
        self._v[:, :, self._n: self._n + n] = value_states
        self._n += n
        self._views()
        return self.keys, self.values

    def place(self, row: int, batch: int, length: int, keys, values):
        """Place rows' keys and values right-aligned (left-padded) into a ``batch``-row cache of ``length`` positions.

        Args:
            row (int): the first batch row written
            batch (int): rows of the cache (allocated on the first call)
            length (int): positions of the cache (L)
            keys (torch.Tensor): the rows' keys with shape (n_rows, Hkv, n, hd), n <= L
            values (torch.Tensor): their values, (n_rows, Hkv, n, hd)
        """
        if self._k is None:
            self._alloc(keys, batch, length + self.reserve)
            self._n = length
        rows, n = keys.shape[0], keys.shape[2]
        self._k[row: row + rows, :, length - n: length] = keys
        self._v[row: row + rows, :, length - n: length] = values
        self._views()

    def get_seq_length(self) -> int:
        """Returns: int: the positions cached."""
        return self._n

    def reorder_cache(self, beam_idx):
        """Keep / reorder batch rows: new row j is old row ``beam_idx[j]`` (beam_idx (N',) long)."""
        if self._k is not None:
            self._k, self._v = self._k.index_select(0, beam_idx), self._v.index_select(0, beam_idx)
            self._views()

    batch_select_indices = reorder_cache


class GrowingCache(Cache):
    """A ``Cache`` of ``GrowingLayer``s.

    Args:
        num_layers (int): how many fresh layers (when ``layers`` is not given)
        reserve (int): the fresh layers' ``reserve``
        layers (Optional[List[GrowingLayer]]): the layers, already filled (a prefill placed row by row)
    """

    def __init__(self, num_layers: int = 0, reserve: int = 64, layers=None):
        super().__init__(layers=layers if layers is not None
                                else [GrowingLayer(reserve) for _ in range(num_layers)])


def join_left_padded(parts, reserve: int = 64):
    """One left-padded cache from several: each part's rows keep their last token in the last column.

    Leading columns that every row of a part masks (the padding left behind by rows that finished) are
    dropped first; the joined cache is as long as the longest part that remains.

    Args:
        parts: a list of ``(layers, mask)``: per layer its ``(keys, values)``, each with shape (n_i, Hkv, L_i, hd),
            left-padded, and the attention mask (n_i, L_i), 0 on padding
        reserve (int): columns allocated beyond the joined length (the layers' ``reserve``)

    Returns:
        Tuple[GrowingCache, torch.Tensor]: the cache of ``sum(n_i)`` rows and L columns, and its mask (sum(n_i), L)
    """
    trimmed = []
    for layers, mask in parts:
        seen = mask.bool().any(0)
        lead = int(seen.long().argmax()) if bool(seen.any()) else mask.shape[1]
        trimmed.append(([(k[:, :, lead:], v[:, :, lead:]) for k, v in layers], mask[:, lead:]))
    B = sum(mask.shape[0] for _, mask in trimmed)
    L = max(mask.shape[1] for _, mask in trimmed)
    out = [GrowingLayer(reserve) for _ in trimmed[0][0]]
    joined = trimmed[0][1].new_zeros(B, L)
    row = 0
    for layers, mask in trimmed:
        n, width = mask.shape
        for layer, (k, v) in zip(out, layers):
            layer.place(row, B, L, k, v)
        joined[row: row + n, L - width:] = mask
        row += n
    return GrowingCache(layers=out), joined
