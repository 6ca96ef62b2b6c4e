"""What one decoding call carries from step to step (:class:`DecodeState`): made per ``generate`` /
``decode`` call by the generator (generator.py), filled by its prefill, passed to every step and to the
greedy and beam loops, so that nothing of a call is kept on the generator. Rows joining a running batch
(decoding/running.py) are added to it with :meth:`DecodeState.join`.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch

from .kv_cache import GrowingCache, join_left_padded
from .static_decode import StaticDecoder


@dataclass
class DecodeState:
    """The per-call state of decoding. N is the number of live batch rows (finished rows dropped, beams
    expanded), t the steps taken.

    Args:
        caps (List[int]): new tokens allowed per original row (B)
        cap_is_task (List[bool]): per original row, whether its cap is its task's (reaching it is a guard)
        mask (Optional[torch.Tensor]): attention mask (N, L + t) of the dynamic path; None on the static path
        cache (Optional[GrowingCache]): the dynamic path's key/value cache (None without a cache, or static)
        r (Optional[torch.Tensor]): stage-2 LoRA scale (N, D) of the live rows, or None
        static (Optional[StaticDecoder]): the static decoder that took over the prefilled cache, or None
        embeds (Optional[torch.Tensor]): without a cache, the whole sequence so far (N, L + t, D)
    """

    caps: List[int]
    cap_is_task: List[bool]
    mask: Optional[torch.Tensor] = None
    cache: Optional[GrowingCache] = None
    r: Optional[torch.Tensor] = None
    static: Optional[StaticDecoder] = None
    embeds: Optional[torch.Tensor] = None

    def select(self, index: torch.Tensor) -> None:
        """Keep / reorder the live rows (finished rows dropped, beams reordered).

        Args:
            index (torch.Tensor): (N',) long: new row j is old row ``index[j]`` (repeats allowed: beams)
        """
        if self.static is not None:
            self.static.select(index)
            return
        self.mask = self.mask.index_select(0, index)
        if self.r is not None:
            self.r = self.r.index_select(0, index)
        if self.cache is not None:
            self.cache.reorder_cache(index)
        else:
            self.embeds = self.embeds.index_select(0, index)

    def join(self, cache: GrowingCache, mask: torch.Tensor, r: Optional[torch.Tensor], room: int) -> None:
        """Add prefilled rows after the live ones (continuous batching): the two caches are placed left-padded into
        one, so every row's last token stays in the last column.

        Args:
            cache (GrowingCache): the newcomers' prefilled cache, (M, Hkv, L', hd) per layer
            mask (torch.Tensor): their attention mask (M, L'), 0 on padding
            r (Optional[torch.Tensor]): their stage-2 LoRA scale (M, D), or None
            room (int): the most tokens any row, live or new, may still add (the static cache's capacity)
        """
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if self.static is not None:
            self.static.join(layers, mask, r, room)
            return
        if self.cache is None:
            raise ValueError("rows join a running batch through its key/value cache; decode with use_cache=True")
        live = [(layer.keys, layer.values) for layer in self.cache.layers]
        self.cache, self.mask = join_left_padded([(live, self.mask), (layers, mask)])
        if self.r is not None:
            self.r = torch.cat([self.r, r.to(self.r.dtype)])
