"""The ``wavllm-serve`` command: load a checkpoint once, bind (127.0.0.1 by default), serve until stopped.

SIGTERM stops it gracefully: no new connections or requests (503 ``shutting_down`` on a kept-alive one), the
requests in flight are answered for up to ``--shutdown-timeout`` seconds (then ended), and it exits 0.
"""
import argparse
import logging
import os
import signal
import socket
import sys
from typing import Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")
API_KEY_ENV = "WAVLLM_API_KEY"


def bind_notice(host: str, api_key: bool = False) -> Optional[str]:
    """What to print when the server listens beyond this machine.

    Args:
        host (str): the address bound
        api_key (bool): whether the API needs a key

    Returns:
        Optional[str]: the notice, None on loopback
    """
    if host in LOOPBACK:
        return None
    who = ("anyone who can reach it and has the API key" if api_key
           else "anyone who can reach it (there is no authentication: set --api-key or WAVLLM_API_KEY)")
    return f"wavllm-serve: --host {host} listens on the network, not only this machine: {who} can use the model"


def _serving_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default="continuous", choices=["continuous", "batch"],
                   help="continuous: requests join the running batch between decoding steps; batch: requests "
                        "arriving within --max-wait-ms decode together to the end")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="--scheduler batch: how long the first waiting request waits for others to join its batch")
    p.add_argument("--max-queue", type=int, default=0,
                   help="most requests waiting to decode; more are refused with 503 and Retry-After (0: no limit)")
    p.add_argument("--request-timeout", type=float, default=0.0,
                   help="seconds from arrival to answer before a request is ended with a 504 (0: no limit)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds the requests in flight get to finish before they are ended")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ (default: ${API_KEY_ENV}; unset: no key)")
    p.add_argument("--model-name", default="wavllm", help="the model id clients send (GET /v1/models)")
    p.add_argument("--max-audio-seconds", type=float, default=60.0, help="longer clips are refused (400)")
    p.add_argument("--max-body-mb", type=float, default=25.0, help="larger request bodies are refused (413)")
    p.add_argument("--default-max-tokens", type=int, default=200, help="answer length cap when a request sets none")
    p.add_argument("--loop-guard-ngram", type=int, default=4,
                   help="stop an answer whose tail repeats an n-gram (n <= this) 3 times; 0 disables")
    p.add_argument("--transcription-instruction", default="Transcribe the audio.",
                   help="what /v1/audio/transcriptions asks the model")
    p.add_argument("--translation-instruction", default="Translate the audio into German.",
                   help="what /v1/audio/translations asks the model (WavLLM's speech translation is into German)")
    p.add_argument("--source-language", default="en",
                   help="the language spoken in the clips (a transcription's 'language' must be it)")


def build_parser() -> argparse.ArgumentParser:
    """Returns: argparse.ArgumentParser: ``wavllm-serve``'s options."""
    p = argparse.ArgumentParser(prog="wavllm-serve", description=__doc__.split("\n")[0] + " OpenAI-compatible "
                                "/v1/chat/completions, /v1/audio/transcriptions, /v1/audio/translations, "
                                "/v1/audio/instruct, /health, /metrics, /v1/models and a web page at /.")
    p.add_argument("--checkpoint", required=True, help="a stage-1/2 checkpoint (.pt) or its .safetensors export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    _serving_options(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--decode-path", default="auto", choices=["auto", "static", "dynamic"],
                   help="auto: static cache + CUDA graphs on a GPU, dynamic cache on a CPU (the faster on each)")
    p.add_argument("--compile-decode-step", action="store_true",
                   help="torch.compile the static path's layer step (faster steps; compiles on the first requests)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--whisper-path", default=None, help="Whisper dir, if not the one in the checkpoint's config")
    p.add_argument("--wavlm-path", default=None, help="WavLM dir, if not the one in the checkpoint's config")
    p.add_argument("--llama-path", default=None, help="LLaMA dir, if not the one in the checkpoint's config")
    p.add_argument("--tokenizer-dir", default=None, help="folder with tokenizer.model, if not the config's")
    p.add_argument("--trust-checkpoint", action="store_true", help="allow full unpickling of a .pt you trust")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def _app(args, api):
    """The engine and the app for the loaded ``api``."""
    # imported here so that --help and argument errors answer without loading torch and fairseq
    from ..decoding.options import static_for
    from .app import create_app
    from .forms import AudioTasks
    from .protocol import Limits
    from .schedulers import SCHEDULERS

    engine = SCHEDULERS[args.scheduler](api, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                        loop_guard_ngram=args.loop_guard_ngram, static=static_for(args.decode_path),
                                        compile_step=args.compile_decode_step, max_queue=args.max_queue)
    limits = Limits(model_name=args.model_name, max_audio_seconds=args.max_audio_seconds,
                    default_max_tokens=args.default_max_tokens, context_length=engine.context_length)
    tasks = AudioTasks(transcription=args.transcription_instruction, translation=args.translation_instruction,
                       language=args.source_language)
    app = create_app(engine, limits, max_body_bytes=int(args.max_body_mb * 2 ** 20), api_key=args.api_key,
                     request_timeout=args.request_timeout, tasks=tasks)
    return engine, app


def _serve(args, engine, app, sock) -> None:
    """Run uvicorn on ``sock`` until SIGTERM / SIGINT; the engine stops taking requests as soon as one comes."""
    import uvicorn  # with the app's imports (see _app)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.stop_accepting()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=args.shutdown_timeout))
    # uvicorn raises a signal it caught again once it has shut down, under the handler found before it ran:
    # this one, so that a SIGTERM ends the process with status 0 after the graceful shutdown
    signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()


def main(argv=None) -> int:
    """``wavllm-serve``: load the checkpoint, bind, serve until SIGTERM (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: 0 after serving (a SIGTERM included), 1 when the checkpoint does not load or the port does not bind
    """
    args = build_parser().parse_args(argv)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    import torch  # with the app's imports (see _app)

    from ..errors import WavLLMInputError
    from ..hub import WavLLM

    if args.threads:
        torch.set_num_threads(args.threads)
    notice = bind_notice(args.host, api_key=bool(args.api_key))
    if notice:
        print(notice, flush=True)
    try:
        api = WavLLM.from_pretrained(args.checkpoint, whisper_path=args.whisper_path, wavlm_path=args.wavlm_path,
                                     llama_path=args.llama_path, tokenizer_dir=args.tokenizer_dir, device=args.device,
                                     trust_checkpoint=args.trust_checkpoint)
    except (WavLLMInputError, OSError, ValueError) as e:
        print(f"wavllm-serve: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    engine, app = _app(args, api)
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"wavllm-serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        engine.close()
        return 1
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"wavllm-serve: {args.model_name} from {args.checkpoint} on http://{shown}:{port}/ "
          f"({args.scheduler} scheduler, max batch {args.max_batch}"
          + (f", max wait {args.max_wait_ms:g} ms" if args.scheduler == "batch" else "")
          + (", API key required" if args.api_key else "") + ")", flush=True)
    _serve(args, engine, app, sock)
    return 0


if __name__ == "__main__":
    sys.exit(main())
