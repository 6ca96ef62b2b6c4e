"""What the serving benchmark and the serving tests run against: a tiny random checkpoint, clips, and
``wavllm-serve`` in a child process on a free loopback port (:class:`ServerProcess`).
"""
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import List, Optional, Tuple

import numpy as np
import soundfile as sf
import torch

from ..data.audio import load_audio
from ..data.manifest import read_manifest
from ..data.prompt_template import DEFAULT_SYSTEM_PROMPT
from ..data.tokenizer import train_sentencepiece
from ..models.wavllm import WavLLMModel

STATIC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serve", "static")


def presets() -> List[str]:
    """The page's instruction presets.

    Returns:
        List[str]: the instructions of static/presets.json
    """
    with open(os.path.join(STATIC, "presets.json"), encoding="utf-8") as f:
        return [p["instruction"] for p in json.load(f)]


# ---------------------------------------------------------------------------------------------- model
def tiny_checkpoint(out_dir: str, seed: int = 0, stage: int = 1) -> str:
    """A ``wavllm_tiny`` checkpoint with random weights (trained-looking LoRA; with ``stage=2`` a random
    prompt-aware adapter, so each row gets its own LoRA scale) and its own sentencepiece tokenizer,
    loadable by ``WavLLM.from_pretrained`` / ``wavllm-serve``: for tests and benchmarks.

    Args:
        out_dir (str): the folder to write (the checkpoint and ``tok/``)
        seed (int): seed of the weights
        stage (int): 1 or 2 (with the prompt-aware adapter)

    Returns:
        str: the checkpoint's path
    """
    words = "the red cat runs to a big blue house and a small dog sleeps under the green tree".split()
    texts = presets() + [" ".join(words), DEFAULT_SYSTEM_PROMPT, "[INST] <<SYS>> <</SYS>> <SPEECH> </SPEECH> [/INST]"]
    tok = train_sentencepiece(texts * 5, os.path.join(out_dir, "tok"), vocab_size=360)
    torch.manual_seed(seed)
    model = WavLLMModel.from_arch("wavllm_tiny", vocab_size=len(tok), lora_dropout=0.0, prompt_adapter=stage == 2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # LoRA B = 0 would make the LLM's answer ignore the speech
        for name, p in model.named_parameters():
            if "lora_B" in name or "prompt_scale" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
        # byte-fallback pieces and <unk> get logit 0, below most word pieces: answers read as (random) words
        for i in range(len(tok)):
            if tok.sp.IsByte(i) or tok.sp.IsUnknown(i):
                model.llm.lm_head.weight[i] = 0.0
    cfg = {k: v for k, v in dataclasses.asdict(model.cfg).items() if not k.startswith("_")}
    cfg["_name"] = "wavllm_tiny"
    path = os.path.join(out_dir, f"tiny_stage{stage}.pt")
    torch.save({"model": model.state_dict(),
                "cfg": {"model": cfg, "task": {"tokenizer_dir": os.path.join(out_dir, "tok")}}}, path)
    return path


# ---------------------------------------------------------------------------------------------- clips
def wav_bytes(wav: np.ndarray, sr: int = 16000, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    """An audio file in memory.

    Args:
        wav (np.ndarray): waveform with shape (T,) or (T, channels)
        sr (int): its sample rate
        subtype (str): soundfile's sample format
        fmt (str): soundfile's container format

    Returns:
        bytes: the file's bytes
    """
    buf = io.BytesIO()
    sf.write(buf, wav, sr, subtype=subtype, format=fmt)
    return buf.getvalue()


def tone_clips(n: int, seed: int = 0) -> List[bytes]:
    """Clips of 0.5-3 s: a tone with noise, each clip different.

    Args:
        n (int): how many
        seed (int): seed of the lengths, pitches and noise

    Returns:
        List[bytes]: ``n`` wav files (16 kHz, 16-bit)
    """
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        secs = 0.5 + 2.5 * rng.random()
        t = np.arange(int(secs * 16000)) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (150 + 400 * rng.random()) * t) + 0.02 * rng.standard_normal(len(t))
        clips.append(wav_bytes(wav.astype(np.float32)))
    return clips


def manifest_clips(manifest: str, n: int) -> List[Tuple[bytes, str]]:
    """The speech rows of an instruction TSV as requests, cycled to ``n``.

    Args:
        manifest (str): the TSV
        n (int): how many

    Returns:
        List[Tuple[bytes, str]]: (wav bytes, prompt) per request
    """
    rows = [r for r in read_manifest(manifest)[0] if r.with_speech]
    if not rows:
        raise SystemExit(f"{manifest}: no rows with audio")
    root = os.path.dirname(os.path.abspath(manifest))
    clips = {r.id: wav_bytes(load_audio(r.audio, root)) for r in rows[:n]}
    return [(clips[rows[i % len(rows)].id], rows[i % len(rows)].prompt) for i in range(n)]


# ---------------------------------------------------------------------------------------------- server process
class ServerProcess:
    """``wavllm-serve`` in a child process on a free loopback port; a context manager (``url`` once entered).

    Args:
        checkpoint (str): the checkpoint it serves
        *args (str): more ``wavllm-serve`` arguments
        env (Optional[dict]): environment variables added to this process's
        log_path (Optional[str]): where its stderr goes (default: a temporary file)
    """

    def __init__(self, checkpoint: str, *args: str, env: Optional[dict] = None, log_path: Optional[str] = None):
        self.cmd = [sys.executable, "-m", "wavllm_fairseq.serve.cli", "--checkpoint", checkpoint, "--host",
                    "127.0.0.1", "--port", "0", "--log-level", "warning", *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc = None
        self.url = None

    def __enter__(self) -> "ServerProcess":
        self._log = open(self.log_path, "w+") if self.log_path else tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env)
        m, line = None, ""
        for _ in range(20):  # the line naming the URL (a --host notice may come first)
            line = self.proc.stdout.readline()
            m = re.search(r" on (http://\S+?)/ ", line)
            if m or not line:
                break
        if not m:
            log = self.log()
            self.__exit__(None, None, None)
            raise RuntimeError(f"wavllm-serve did not start: {line!r}\n{log[-3000:]}")
        self.url = m.group(1)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError("wavllm-serve did not answer /health within 60 s")

    @property
    def pid(self) -> int:
        """Returns: int: the server's process id."""
        return self.proc.pid

    def log(self) -> str:
        """The server's stderr so far (while it runs)."""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
