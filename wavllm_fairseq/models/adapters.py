"""Modality adapters (one per speech encoder), the fusion of their two streams and the projector into the LLM.

Each adapter (paper section 3.1; sizes of the reference implementation):

    x (B, T, C_enc) at 20 ms
      -> Conv1d(k=3, s=2) + GLU -> Conv1d(k=3, s=2) + GLU      (B, T', C_mid) at 80 ms
      -> bottleneck: x + LayerNorm(Up(GELU(Down(x))))           (B, T', C_mid)  ("post", the reference's)
                 or x + Up(GELU(Down(LayerNorm(x))))            ("pre", the usual pre-norm Houlsby form)
      -> Linear(C_mid -> C_out)                                 (B, T', C_out)

Frames past a clip's length are zeroed before each conv (batch invariance).
Output length of each conv: ``floor((L - 1) / 2) + 1`` (kernel 3, stride 2, padding 1), so
``T' = conv_out_len(conv_out_len(T))``.

Fusion and projection (paper section 3.1, the reference's order)::

    semantic (B, N1, A), acoustic (B, N2, A) -> both trimmed to N = min(N1, N2) -> concat (B, N, 2A)
      -> Projector Linear(2A -> D)                                                (B, N, D)

Without WavLM the semantic stream goes through its own Linear(A -> D); the reference holds that one
even when WavLM is on (unused there; see trainability.py).
"""
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


ADAPTER_KERNELS = (3, 3)  # two stride-2 convolutions: 20 ms -> 80 ms
ADAPTER_STRIDE = 2


def conv_out_len(lengths, kernel: int = 3, stride: int = 2, padding: int = 1):
    """Frames out of one Conv1d: floor((L + 2p - k) / s) + 1.

    Args:
        lengths (int or torch.Tensor): input frames L.
        kernel (int): kernel size k.
        stride (int): stride s.
        padding (int): padding p on each side.

    Returns:
        int or torch.Tensor: output frames, of the type of ``lengths``.
    """
    return (lengths + 2 * padding - kernel) // stride + 1


def subsampled_frames(lengths, kernel_sizes: Sequence[int] = ADAPTER_KERNELS, stride: int = ADAPTER_STRIDE):
    """Frames out of the adapters' conv subsampler (:func:`conv_out_len` per layer, padding k // 2).

    Args:
        lengths (int or torch.Tensor): input frames (20 ms).
        kernel_sizes (Sequence[int]): one kernel per conv layer.
        stride (int): every layer's stride.

    Returns:
        int or torch.Tensor: output frames (80 ms with the defaults), of the type of ``lengths``.
    """
    for k in kernel_sizes:
        lengths = conv_out_len(lengths, k, stride, k // 2)
    return lengths


class GLUConvSubsampler(nn.Module):
    """Stack of stride-2 Conv1d + GLU layers (the reference's Conv1dSubsampler layout).

    Layer i maps ``in_channels`` (first) or ``mid_channels // 2`` (later) to ``mid_channels`` (not last)
    or ``2 * out_channels`` (last); GLU halves the channels.

    Args:
        in_channels (int): input width C_enc.
        mid_channels (int): conv output channels of the inner layers (before GLU).
        out_channels (int): output width C_out (after the last GLU).
        kernel_sizes (Sequence[int]): one kernel per layer.
        stride (int): every layer's stride.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int,
                 kernel_sizes: Sequence[int] = ADAPTER_KERNELS, stride: int = ADAPTER_STRIDE):
        super().__init__()
        n = len(kernel_sizes)
        self.kernel_sizes = tuple(kernel_sizes)
        self.stride = stride
        self.conv_layers = nn.ModuleList(
            nn.Conv1d(
                in_channels if i == 0 else mid_channels // 2,
                mid_channels if i < n - 1 else out_channels * 2,
                k,
                stride=stride,
                padding=k // 2,
            )
            for i, k in enumerate(kernel_sizes)
        )

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames; see :func:`subsampled_frames`.

        Args:
            lengths (torch.Tensor): input frames, shape (B,).

        Returns:
            torch.Tensor: output frames, shape (B,).
        """
        return subsampled_frames(lengths, self.kernel_sizes, self.stride)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Subsample, zeroing the frames past each clip's length before every conv.

        Args:
            x (torch.Tensor): input with shape (B, T, C_in).
            lengths (torch.Tensor): valid frames, shape (B,).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: output with shape (B, T', C_out) and its lengths (B,).
        """
        # frames past each clip's length are zeroed before every conv, so the last valid output frame
        # sees the same zero padding whether the clip is batched with longer ones or alone
        x = x.transpose(1, 2)  # (B, C, T)
        for conv, k in zip(self.conv_layers, self.kernel_sizes):
            valid = torch.arange(x.shape[2], device=x.device)[None, None, :] < lengths.to(x.device)[:, None, None]
            x = F.glu(conv(x * valid.to(x.dtype)), dim=1)  # (B, C', ~T/2)
            lengths = conv_out_len(lengths, k, self.stride, k // 2)
        return x.transpose(1, 2), lengths  # (B, T', C_out)


NORM_PLACEMENTS = ("post", "pre")


class BottleneckAdapter(nn.Module):
    """Houlsby-style down-up adapter with a residual.

    ``norm="post"`` (default, the reference implementation's): ``x + LayerNorm(Up(GELU(Down(x))))``;
    ``norm="pre"``: ``x + Up(GELU(Down(LayerNorm(x))))``. Same parameters either way.

    Args:
        dim (int): input and output width.
        bottleneck (int): the Down / Up inner width.
        norm (str): LayerNorm placement, one of ``NORM_PLACEMENTS``.
    """

    def __init__(self, dim: int, bottleneck: int, norm: str = "post"):
        super().__init__()
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"bottleneck norm must be one of {NORM_PLACEMENTS}, got {norm!r}")
        self.norm = norm
        self.layer_norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The residual adapter of the class docstring.

        Args:
            x (torch.Tensor): input with shape (..., dim).

        Returns:
            torch.Tensor: output with the shape of ``x``.
        """
        if self.norm == "pre":
            return x + self.up(F.gelu(self.down(self.layer_norm(x))))
        return x + self.layer_norm(self.up(F.gelu(self.down(x))))


class ModalityAdapter(nn.Module):
    """Conv subsampler (20 ms -> 80 ms) + bottleneck adapter + linear to ``out_dim``.

    With ``num_layer_weights > 0`` the adapter also owns the learnable softmax weights over the
    encoder's hidden states (WavLM branch) and its input is the stack of all hidden states.

    Args:
        in_dim (int): the encoder's width.
        conv_mid_dim (int): conv 1 channels (before GLU).
        conv_out_dim (int): conv output width (after GLU), also the bottleneck's width.
        bottleneck_dim (int): the bottleneck's inner width.
        out_dim (int): output width A.
        num_layer_weights (int): hidden states to weight (L + 1), or 0 for a single input.
        bottleneck_norm (str): LayerNorm placement in the bottleneck (``BottleneckAdapter``).
    """

    def __init__(self, in_dim: int, conv_mid_dim: int, conv_out_dim: int, bottleneck_dim: int, out_dim: int,
                 num_layer_weights: int = 0, bottleneck_norm: str = "post"):
        super().__init__()
        self.subsampler = GLUConvSubsampler(in_dim, conv_mid_dim, conv_out_dim)
        self.bottleneck = BottleneckAdapter(conv_out_dim, bottleneck_dim, bottleneck_norm)
        self.out_proj = nn.Linear(conv_out_dim, out_dim)
        if num_layer_weights > 0:
            # softmax over all hidden states (embedding output + every layer), initialised uniform
            self.layer_weights = nn.Parameter(torch.ones(num_layer_weights))
        else:
            self.register_parameter("layer_weights", None)

    def combine_layers(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The softmax-weighted sum of the stacked hidden states.

        Args:
            hidden_states (torch.Tensor): stacked hidden states with shape (L, B, T, C).

        Returns:
            torch.Tensor: their weighted sum with shape (B, T, C).
        """
        if hidden_states.shape[0] != self.layer_weights.numel():
            raise ValueError(f"expected {self.layer_weights.numel()} hidden states, got {hidden_states.shape[0]}")
        w = torch.softmax(self.layer_weights.float(), dim=0).to(hidden_states.dtype)
        return torch.einsum("l,lbtc->btc", w, hidden_states)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Output frames (80 ms) of the conv subsampler.

        Args:
            lengths (torch.Tensor): encoder frames (20 ms), shape (B,).

        Returns:
            torch.Tensor: output frames, shape (B,).
        """
        return self.subsampler.output_lengths(lengths)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer weights (WavLM branch), conv subsampler, bottleneck, linear.

        Args:
            x (torch.Tensor): encoder output with shape (B, T, C_enc), or (L, B, T, C_enc) stacked
                hidden states with ``num_layer_weights``.
            lengths (torch.Tensor): valid frames (20 ms), shape (B,).

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: output with shape (B, T', out_dim) at 80 ms and its lengths (B,).
        """
        if self.layer_weights is not None:
            x = self.combine_layers(x)  # (L, B, T, C) -> (B, T, C)
        x, lengths = self.subsampler(x, lengths)  # (B, T', C_mid)
        x = self.bottleneck(x)
        return self.out_proj(x), lengths  # (B, T', out_dim)


class Projector(nn.Linear):
    """Linear from the adapters' output to the LLM width (a plain Linear: the checkpoint keys are
    ``projector.weight`` / ``projector.bias``, as in the reference)."""


def fuse_streams(sem: torch.Tensor, sem_len: torch.Tensor, ac: torch.Tensor,
                 ac_len: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Trim both adapter outputs to the shorter stream, as the reference does, and concatenate.

    Args:
        sem (torch.Tensor): semantic adapter output with shape (B, N1, A).
        sem_len (torch.Tensor): its lengths, shape (B,).
        ac (torch.Tensor): acoustic adapter output with shape (B, N2, A).
        ac_len (torch.Tensor): its lengths, shape (B,).

    Returns:
        Tuple[torch.Tensor, torch.Tensor]: the fused stream with shape (B, N, 2A), N = min(N1, N2), and
        its lengths (B,) <= N.
    """
    n = min(sem.shape[1], ac.shape[1])
    x = torch.cat([sem[:, :n], ac[:, :n]], dim=-1)
    lengths = torch.minimum(torch.minimum(sem_len, ac_len), torch.full_like(sem_len, n)).clamp(min=0)
    return x, lengths
