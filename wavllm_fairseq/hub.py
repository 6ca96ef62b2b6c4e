"""The Python API: load a trained checkpoint and ask questions about audio, no fairseq code needed.

    from wavllm_fairseq import WavLLM
    m = WavLLM.from_pretrained("checkpoints/stage2/checkpoint_best.pt")   # backbone dirs from its config
    m.generate(["a.wav", "b.flac"], ["What is the speaker's emotion?", "Transcribe the audio."])

Audio may be a path (wav/flac/ogg, any rate/channels; a relative path starts from ``audio_root``, by default
the working directory), a 1-D float array at 16 kHz, a ``(array, sample_rate)`` pair, or ``None`` for a
text-only question. Checkpoints are read safely
(see checkpoint_io.py): ``.safetensors`` exports always, fairseq ``.pt`` files with weights-only
unpickling; ``trust_checkpoint=True`` allows full unpickling of a file you trust.
"""
import logging
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import OmegaConf

from .data.audio import load_audio, resample_to_16k
from .data.chat_template import prompt_encoder
from .data.dataset import collate, inference_item
from .data.tokenizer import LlamaTokenizer
from .decoding.options import DecodingOptions, static_for
from .models.checkpoint_io import load_checkpoint_file
from .models.config import WavLLMConfig
from .models.wavllm import WavLLMModel
from .tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask

logger = logging.getLogger(__name__)

AudioInput = Union[str, np.ndarray, tuple, None]


class WavLLM:
    """A loaded WavLLM model + tokenizer + generator, answering batched (audio, instruction) questions."""

    def __init__(self, model, task, device="cpu", audio_root: Optional[str] = None):
        self.model = model.eval().to(device)
        self.task = task
        self.tokenizer = task.tokenizer
        self.device = device
        self.audio_root = audio_root or ""  # where relative audio paths start from ("": the working directory)

    @classmethod
    def from_pretrained(cls, checkpoint: str, *, whisper_path: Optional[str] = None, wavlm_path: Optional[str] = None,
                        llama_path: Optional[str] = None, tokenizer_dir: Optional[str] = None, device: str = "cpu",
                        trust_checkpoint: bool = False, merge_lora: bool = True,
                        audio_root: Optional[str] = None) -> "WavLLM":
        """Load a fairseq checkpoint (``.pt``) or a safetensors export of one.

        Backbone directories default to the ones recorded in the checkpoint's config; pass them when the
        checkpoint was trained elsewhere. ``merge_lora`` folds stage-1 LoRA into the base weights for
        faster decoding (stage-2 LoRA is scaled per utterance and stays separate). ``audio_root`` is the
        folder relative audio paths given to :meth:`generate` start from, as the reference's ``audio_root``
        (default: the working directory; the training run's ``task.audio_root`` is not used).

        Args:
            checkpoint (str): the ``.pt`` or ``.safetensors`` file.
            whisper_path (Optional[str]): the Whisper folder (default: the checkpoint's ``model.whisper_path``).
            wavlm_path (Optional[str]): the WavLM folder (default: the checkpoint's).
            llama_path (Optional[str]): the LLM folder (default: the checkpoint's).
            tokenizer_dir (Optional[str]): the tokenizer folder (default: ``task.tokenizer_dir``, else the LLM's).
            device (str): where the model runs.
            trust_checkpoint (bool): allow full unpickling of a ``.pt`` file you trust.
            merge_lora (bool): fold stage-1 LoRA into the base weights.
            audio_root (Optional[str]): where relative audio paths start from.

        Returns:
            WavLLM: the loaded model.
        """
        state = load_checkpoint_file(checkpoint, trust=trust_checkpoint)
        cfg = state["cfg"]
        model_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMConfig), _strip(cfg["model"], WavLLMConfig))
        for key, value in (("whisper_path", whisper_path), ("wavlm_path", wavlm_path), ("llama_path", llama_path)):
            if value is not None:
                model_cfg[key] = value
        task_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig),
                                   _strip(cfg.get("task", {}) or {}, WavLLMInstructionConfig))
        tok_dir = tokenizer_dir or task_cfg.get("tokenizer_dir") or model_cfg.llama_path
        if tokenizer_dir is None and task_cfg.get("tokenizer_dir") and not os.path.isdir(task_cfg.tokenizer_dir):
            tok_dir = model_cfg.llama_path
        tokenizer = LlamaTokenizer.from_dir(tok_dir)
        task = WavLLMInstructionTask(task_cfg, tokenizer)
        model_cfg["_name"] = cfg["model"].get("_name", "wavllm")
        model = WavLLMModel.build_model(model_cfg, task)
        model.load_state_dict(state["model"])
        if merge_lora and model.prompt_scale is None:
            model.merge_lora()
        return cls(model, task, device, audio_root=audio_root)

    def _item(self, i: int, audio: AudioInput, instruction: str, task_name: str):
        wav = None
        if isinstance(audio, str):
            wav = load_audio(audio, self.audio_root)
        elif isinstance(audio, tuple):
            wav = resample_to_16k(np.asarray(audio[0], dtype=np.float32), int(audio[1]))
        elif audio is not None:
            wav = np.asarray(audio, dtype=np.float32)
            if wav.ndim != 1:
                raise ValueError(f"audio array {i} must be 1-D 16 kHz mono (got shape {wav.shape}); "
                                 "pass (array, sr) to resample")
        encode = prompt_encoder(getattr(self.task.cfg, "chat_template", "reference"))
        enc = encode(self.tokenizer, [(instruction, None)], with_speech=wav is not None,
                     system=self.task.cfg.system_prompt)
        return inference_item(i, wav, enc, task=task_name)

    @torch.inference_mode()
    def generate(self, audios: Sequence[AudioInput], instructions: Sequence[str], *, beam: int = 1,
                 max_len_b: int = 200, max_len_a: float = 0.0, sampling: bool = False, temperature: float = 1.0,
                 top_k: int = -1, top_p: float = -1.0, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                 loop_guard_ngram: int = 4, batch_size: int = 8, task_names: Optional[Sequence[str]] = None,
                 seed: int = 0, compile_step: Optional[bool] = None) -> List[str]:
        """Answer ``instructions[i]`` about ``audios[i]``; returns one string per question, in order.

        ``compile_step`` (default: the task's ``compile_decode_step``) runs the static decoding step through
        ``torch.compile`` (a GPU speed-up; the answers are the same)."""
        if len(audios) != len(instructions):
            raise ValueError(f"{len(audios)} audios but {len(instructions)} instructions")
        torch.manual_seed(seed)
        options = DecodingOptions(beam_size=beam, max_len_a=max_len_a, max_len_b=max_len_b, sampling=sampling,
                                  temperature=temperature, sampling_topk=top_k, sampling_topp=top_p,
                                  no_repeat_ngram_size=no_repeat_ngram_size, repetition_penalty=repetition_penalty,
                                  loop_guard_ngram=loop_guard_ngram,
                                  static=static_for(getattr(self.task.cfg, "decode_path", "auto")),
                                  compile_step=(getattr(self.task.cfg, "compile_decode_step", False)
                                                if compile_step is None else compile_step))
        gen = options.build(self.model, self.task.target_dictionary)
        names = list(task_names) if task_names is not None else ["api"] * len(audios)
        items = [self._item(i, a, q, n) for i, (a, q, n) in enumerate(zip(audios, instructions, names))]
        answers: List[Optional[str]] = [None] * len(items)
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size], self.tokenizer.pad_id)
            batch = batch_to(batch, self.device)
            hyps = gen.generate([self.model], batch)
            for idx, nbest in zip(batch["id"].tolist(), hyps):
                answers[idx] = self.tokenizer.decode(nbest[0]["tokens"].tolist())
        return answers  # type: ignore[return-value]


def _strip(node, dataclass_type):
    """Keep only the fields the dataclass knows (older checkpoints may carry extra keys)."""
    data = OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else dict(node)
    known = set(dataclass_type.__dataclass_fields__)
    return {k: v for k, v in data.items() if k in known and not (isinstance(v, str) and v.startswith("${"))}


def batch_to(batch, device):
    """The collater's batch (nested dicts of tensors and other values) with every tensor on ``device``."""
    if isinstance(batch, dict):
        return {k: batch_to(v, device) for k, v in batch.items()}
    if torch.is_tensor(batch):
        return batch.to(device)
    return batch
