"""``wavllm-bench-serve``: what dynamic batching buys over answering one request at a time.

    wavllm-bench-serve [--checkpoint C] [--manifest M] [--requests 64] [--concurrency 16]
                       [--max-batch 8] [--max-wait-ms 20] [--max-tokens 32] [--threads N]

Starts ``wavllm-serve`` twice on a free loopback port -- ``--max-batch 1`` (one at a time) and
``--max-batch N`` -- sends the same ``--requests`` greedy chat requests from ``--concurrency`` client
threads to each, and prints requests/s, answer tokens/s and latency percentiles per run, whether
every answer was equal between the two runs, and a last line ``throughput_gain <float>`` (batched
answer tokens/s over one-at-a-time's). Clips come from ``--manifest`` (an instruction TSV, e.g. the
toy corpus's ``test_asr.tsv``) or are synthesized tones of 0.5-3 s; without ``--checkpoint`` a tiny
random checkpoint (:func:`tiny_checkpoint`) is built in a temporary folder.
"""
import argparse
import base64
import concurrent.futures
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
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


# ---------------------------------------------------------------------------------------------- clients
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


def chat_body(audio: Optional[bytes], instruction: str, max_tokens: int, model: str = "wavllm", **extra) -> dict:
    """A greedy ``/v1/chat/completions`` request body.

    Args:
        audio (Optional[bytes]): a wav file sent as ``input_audio``, or None for a text-only question
        instruction (str): the question
        max_tokens (int): the answer's cap
        model (str): the model name
        **extra: more body fields (they win over the defaults)

    Returns:
        dict: the JSON body
    """
    content = [{"type": "text", "text": instruction}]
    if audio is not None:
        content.append({"type": "input_audio",
                        "input_audio": {"data": base64.b64encode(audio).decode(), "format": "wav"}})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}


def post_json(url: str, body: dict, timeout: float = 120.0) -> Tuple[int, dict]:
    """POST ``body`` as JSON.

    Args:
        url (str): where
        body (dict): the JSON body
        timeout (float): seconds

    Returns:
        Tuple[int, dict]: the HTTP status and the JSON answer (an error's too)
    """
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def run_load(base_url: str, bodies: List[dict], concurrency: int, timeout: float = 120.0):
    """POST every body to /v1/chat/completions from ``concurrency`` threads.

    Args:
        base_url (str): the server (``http://host:port``)
        bodies (List[dict]): the request bodies
        concurrency (int): client threads
        timeout (float): seconds per request

    Returns:
        Tuple[List[Tuple[int, dict, float]], float]: (status, response, latency s) in body order, and the wall
        seconds of the whole load
    """
    def one(body):
        t = time.perf_counter()
        status, resp = post_json(base_url + "/v1/chat/completions", body, timeout)
        return status, resp, time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, bodies))
    return results, time.perf_counter() - t0


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
            self.__exit__(None, None, None)
            self._log.seek(0)
            raise RuntimeError(f"wavllm-serve did not start: {line!r}\n{self._log.read()[-3000:]}")
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

    def log(self) -> str:
        """The server's stderr so far."""
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


def _stats(url: str) -> dict:
    with urllib.request.urlopen(url + "/health") as r:
        return json.loads(r.read())["stats"]


def _pct(xs: List[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: the exit status
    """
    p = argparse.ArgumentParser(prog="wavllm-bench-serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="default: a tiny random checkpoint built in a temp folder")
    p.add_argument("--manifest", default=None, help="instruction TSV whose clips and prompts to send")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="torch threads of the server")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.requests < 1 or args.concurrency < 1:
        p.error("--requests and --concurrency must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.checkpoint or tiny_checkpoint(tmp)
        if args.manifest:
            pairs = manifest_clips(args.manifest, args.requests)
        else:
            prompts = presets()
            pairs = [(c, prompts[i % len(prompts)]) for i, c in enumerate(tone_clips(args.requests))]
        bodies = [chat_body(a, q, args.max_tokens) for a, q in pairs]
        extra = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        runs = {}
        for label, batch in (("one_at_a_time", 1), ("batched", args.max_batch)):
            with ServerProcess(ckpt, "--max-batch", str(batch), "--max-wait-ms", str(args.max_wait_ms), *extra) as srv:
                run_load(srv.url, bodies[: min(4, len(bodies))], 2)  # warm-up
                before = _stats(srv.url)
                results, wall = run_load(srv.url, bodies, args.concurrency)
                after = _stats(srv.url)
            bad = [s for s, _, _ in results if s != 200]
            if bad:
                print(f"{label}: {len(bad)} of {len(results)} requests failed (status {bad[0]})", file=sys.stderr)
                return 1
            tokens = sum(r["usage"]["completion_tokens"] for _, r, _ in results)
            lat = [t for _, _, t in results]
            runs[label] = dict(answers=[r["choices"][0]["message"]["content"] for _, r, _ in results],
                               tps=tokens / wall, rps=len(results) / wall)
            print(f"{label:14s} max_batch={batch} requests={len(results)} wall={wall:.2f}s "
                  f"req/s={len(results) / wall:.2f} tokens/s={tokens / wall:.1f} "
                  f"latency_p50={_pct(lat, 50):.3f}s p95={_pct(lat, 95):.3f}s "
                  f"batches={after['batches'] - before['batches']} largest_batch={after['largest_batch']}", flush=True)
    equal = runs["batched"]["answers"] == runs["one_at_a_time"]["answers"]
    print(f"answers_equal {equal}")
    print(f"throughput_gain {runs['batched']['tps'] / runs['one_at_a_time']['tps']:.3f}")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
