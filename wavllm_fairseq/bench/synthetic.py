"""What the benchmarks run on, built in one place: a random-weight model, synthetic batches (a training
batch's ``net_input``, a decoding benchmark's generation prefixes) and the two ids a generator reads from a
dictionary. Nothing is read from disk; every draw is seeded.
"""
import torch

from ..models.wavllm import GenerationPrefix, WavLLMModel

PRE_TOKENS = 40  # template tokens before the speech span in a training batch


class TargetDictionary:
    """The part of a fairseq dictionary a generator reads: ``eos()`` and ``pad()`` (no ``<unk>`` to ban).

    Args:
        eos (int): the end-of-answer id
    """

    def __init__(self, eos: int):
        self._eos = eos

    def eos(self) -> int:
        """Returns: int: the end-of-answer id."""
        return self._eos

    def pad(self) -> int:
        """Returns: int: 0, the padding id."""
        return 0


def random_model(arch: str, vocab: int, device: str, dtype: torch.dtype, stage: int = 1) -> WavLLMModel:
    """A random-weight model built directly on ``device`` in ``dtype`` (``wavllm_7b`` is never materialised
    on the CPU), in eval mode, with a non-zero LoRA as after training.

    Args:
        arch (str): a named architecture (``wavllm_tiny``, ``wavllm_small``, ``wavllm_7b`` ...)
        vocab (int): vocabulary size
        device (str): where to build it
        dtype (torch.dtype): its parameters' dtype
        stage (int): 2 adds the prompt-aware LoRA scale

    Returns:
        WavLLMModel: the model
    """
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = WavLLMModel.from_arch(arch, vocab_size=vocab, prompt_adapter=stage == 2).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():  # a non-zero LoRA, as after training
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.02)
    return model


def training_net_input(batch: int, seconds: float, text: int, vocab: int, device: str) -> dict:
    """A training batch's ``net_input`` (data/dataset.py) of equal rows: ``seconds`` of noise, 40 template
    tokens, ``text`` post-speech tokens of which the last half are targets, a 12-token instruction.
    Drawn from torch's global generator.

    Args:
        batch (int): rows (B)
        seconds (float): audio per row (T = 16000 * seconds samples)
        text (int): post-speech tokens per row (Q)
        vocab (int): token ids are drawn from [3, vocab)
        device (str): where the tensors are made

    Returns:
        dict: audio (B, T), audio_lengths (B,), pre_tokens (B, 40), pre_lengths (B,), post_tokens (B, Q),
        post_lengths (B,), post_target_mask (B, Q), instruction_tokens (B, 12), instruction_lengths (B,)
    """
    T = int(seconds * 16000)
    n_target = text // 2
    return dict(
        audio=0.1 * torch.randn(batch, T, device=device), audio_lengths=torch.full((batch,), T, device=device),
        pre_tokens=torch.randint(3, vocab, (batch, PRE_TOKENS), device=device),
        pre_lengths=torch.full((batch,), PRE_TOKENS, device=device),
        post_tokens=torch.randint(3, vocab, (batch, text), device=device),
        post_lengths=torch.full((batch,), text, device=device),
        post_target_mask=torch.cat([torch.zeros(batch, text - n_target, dtype=torch.bool),
                                    torch.ones(batch, n_target, dtype=torch.bool)], 1).to(device),
        instruction_tokens=torch.randint(3, vocab, (batch, 12), device=device),
        instruction_lengths=torch.full((batch,), 12, device=device))


def generation_prefixes(model: WavLLMModel, batch: int, vocab: int, seed: int = 0,
                        device: str = "cpu") -> GenerationPrefix:
    """Left-padded generation prefixes of different lengths, as in a real multi-task batch: speech of 4-12 s
    (8 s alone), 45 template tokens, 20-60 post-speech tokens (40 alone), an 8-token instruction.

    Args:
        model (WavLLMModel): the model that encodes the speech and builds the prefixes
        batch (int): rows (B)
        vocab (int): token ids are drawn from [3, vocab)
        seed (int): seed of the draws
        device (str): the model's device

    Returns:
        GenerationPrefix: embeds (B, L, D), attention_mask (B, L), lora_scale (B, D) or None
    """
    g = torch.Generator().manual_seed(seed)
    secs = torch.linspace(4.0, 12.0, batch) if batch > 1 else torch.tensor([8.0])
    audio_len = (secs * 16000).long()
    pre_len = torch.full((batch,), 45)
    post_len = torch.linspace(20, 60, batch).long() if batch > 1 else torch.tensor([40])
    audio = torch.zeros(batch, int(audio_len.max()))
    for b in range(batch):
        audio[b, : audio_len[b]] = 0.1 * torch.randn(int(audio_len[b]), generator=g)
    net = dict(audio=audio, audio_lengths=audio_len,
               pre_tokens=torch.randint(3, vocab, (batch, 45), generator=g), pre_lengths=pre_len,
               post_tokens=torch.randint(3, vocab, (batch, int(post_len.max())), generator=g), post_lengths=post_len,
               instruction_tokens=torch.randint(3, vocab, (batch, 8), generator=g),
               instruction_lengths=torch.full((batch,), 8))
    net = {k: v.to(device) for k, v in net.items()}
    with torch.no_grad():
        return model.build_generation_prefix(net)
