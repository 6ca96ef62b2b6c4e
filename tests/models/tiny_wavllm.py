"""A seeded ``wavllm_tiny`` model and a collater-shaped batch for it, shared by the tests of tests/models/."""
import torch

from wavllm_fairseq.models.wavllm import WavLLMModel

VOCAB = 100


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return WavLLMModel.from_arch("wavllm_tiny", vocab_size=VOCAB, **kw)


def make_batch(audio_lengths, pre=(5, 5, 5), post=(6, 9, 4), n_target=(3, 4, 2), seed=0):
    """A right-padded batch dict as the collater makes it (see dataset.py)."""
    g = torch.Generator().manual_seed(seed)
    B = len(audio_lengths)
    T = max(max(audio_lengths), 1)
    audio = torch.zeros(B, T)
    for b, n in enumerate(audio_lengths):
        audio[b, :n] = 0.1 * torch.randn(n, generator=g)
    P, Q = max(pre[:B]), max(post[:B])
    pre_t = torch.zeros(B, P, dtype=torch.long)
    post_t = torch.zeros(B, Q, dtype=torch.long)
    tmask = torch.zeros(B, Q, dtype=torch.bool)
    for b in range(B):
        pre_t[b, : pre[b]] = torch.randint(3, VOCAB, (pre[b],), generator=g)
        post_t[b, : post[b]] = torch.randint(3, VOCAB, (post[b],), generator=g)
        tmask[b, post[b] - n_target[b]: post[b]] = True
    instr = torch.randint(3, VOCAB, (B, 4), generator=g)
    return dict(audio=audio, audio_lengths=torch.tensor(audio_lengths), pre_tokens=pre_t,
                pre_lengths=torch.tensor(pre[:B]), post_tokens=post_t, post_lengths=torch.tensor(post[:B]),
                post_target_mask=tmask, instruction_tokens=instr, instruction_lengths=torch.tensor([4, 3, 2][:B]))

