"""``wavllm-serve``: an OpenAI-compatible HTTP server with dynamic batching, and a web page.

    wavllm-serve --checkpoint work_toy/stage2/checkpoint_last.pt [--host 127.0.0.1] [--port 8000]
                 [--max-batch 8] [--max-wait-ms 20]

Files, one role each:
    engine.py     dynamic batching over the batched generator; token streaming and cancelling
    protocol.py   request bodies (OpenAI chat format, input_audio parts) -> checked jobs; API errors
    app.py        the HTTP endpoints (FastAPI), server-sent events, the body-size limit
    cli.py        the wavllm-serve command
    bench.py      wavllm-bench-serve: throughput of dynamic batching vs one request at a time
    static/       the page at / (plain HTML + JS, no build step, nothing loaded from elsewhere)

Why FastAPI + uvicorn: it is the stack the OpenAI-compatible servers people already run speech LLMs
behind use (vLLM, SGLang), well kept, ASGI, so one event loop holds many waiting or streaming clients
while a single worker thread owns the model; server-sent events are a ``StreamingResponse`` that
is cancelled when its client disconnects; multipart uploads come from python-multipart. Flask
(WSGI) would need a thread per waiting client and has no disconnect signal; aiohttp would do but
is its own framework; Gradio pulls a large front end and speaks its own API, not OpenAI's.
Install with ``pip install -e ".[serve]"``.
"""
