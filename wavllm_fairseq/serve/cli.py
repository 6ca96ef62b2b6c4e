"""The ``wavllm-serve`` command: load a checkpoint once, bind (127.0.0.1 by default), serve until stopped."""
import argparse
import logging
import socket
import sys
from typing import Optional

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def bind_notice(host: str) -> Optional[str]:
    """What to print when the server listens beyond this machine (None on loopback)."""
    if host in LOOPBACK:
        return None
    return (f"wavllm-serve: --host {host} listens on the network, not only this machine: anyone who can reach it "
            "can use the model (there is no authentication)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wavllm-serve", description=__doc__.split("\n")[0] + " OpenAI-compatible "
                                "/v1/chat/completions, /v1/audio/instruct, /health, /v1/models and a web page at /.")
    p.add_argument("--checkpoint", required=True, help="a stage-1/2 checkpoint (.pt) or its .safetensors export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port, printed at start)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoded together")
    p.add_argument("--max-wait-ms", type=float, default=20.0,
                   help="how long the first waiting request waits for others to join its batch")
    p.add_argument("--model-name", default="wavllm", help="the model id clients send (GET /v1/models)")
    p.add_argument("--max-audio-seconds", type=float, default=60.0, help="longer clips are refused (400)")
    p.add_argument("--max-body-mb", type=float, default=25.0, help="larger request bodies are refused (413)")
    p.add_argument("--default-max-tokens", type=int, default=200, help="answer length cap when a request sets none")
    p.add_argument("--loop-guard-ngram", type=int, default=4,
                   help="stop an answer whose tail repeats an n-gram (n <= this) 3 times; 0 disables")
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


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    # imported here so that --help and argument errors answer without loading torch and fairseq
    import torch
    import uvicorn

    from ..decoding.options import static_for
    from ..errors import WavLLMInputError
    from ..hub import WavLLM
    from .app import create_app
    from .engine import BatchEngine
    from .protocol import Limits

    if args.threads:
        torch.set_num_threads(args.threads)
    notice = bind_notice(args.host)
    if notice:
        print(notice, flush=True)
    try:
        api = WavLLM.from_pretrained(args.checkpoint, whisper_path=args.whisper_path, wavlm_path=args.wavlm_path,
                                     llama_path=args.llama_path, tokenizer_dir=args.tokenizer_dir, device=args.device,
                                     trust_checkpoint=args.trust_checkpoint)
    except (WavLLMInputError, OSError, ValueError) as e:
        print(f"wavllm-serve: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    engine = BatchEngine(api, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                         loop_guard_ngram=args.loop_guard_ngram,
                         static=static_for(args.decode_path),
                         compile_step=args.compile_decode_step)
    limits = Limits(model_name=args.model_name, max_audio_seconds=args.max_audio_seconds,
                    default_max_tokens=args.default_max_tokens, context_length=engine.context_length)
    app = create_app(engine, limits, max_body_bytes=int(args.max_body_mb * 2 ** 20))
    try:
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        print(f"wavllm-serve: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"wavllm-serve: {args.model_name} from {args.checkpoint} on http://{shown}:{port}/ "
          f"(max batch {args.max_batch}, max wait {args.max_wait_ms:g} ms)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
