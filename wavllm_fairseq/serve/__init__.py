"""``wavllm-serve``: an OpenAI-compatible HTTP server with continuous batching, and a web page.

    wavllm-serve --checkpoint work_toy/stage2/checkpoint_last.pt [--host 127.0.0.1] [--port 8000]
                 [--scheduler continuous|batch] [--max-batch 8] [--max-queue N] [--request-timeout S]
                 [--api-key KEY]

Files, one role each:
    engine.py      a request (Job), its answer, the engine that owns the model and takes requests
    schedulers.py  continuous batching (requests join between steps) and batch-at-a-time
    protocol.py    request bodies (OpenAI chat format, input_audio parts) -> checked requests; API errors
    forms.py       the multipart endpoints' forms (instruct, OpenAI's transcriptions and translations)
    answers.py     a checked request -> its answer or its stream; timeouts, a full queue, clients leaving
    formats.py     each endpoint's JSON body and server-sent events
    routes.py      the endpoints, by group; app.py builds the FastAPI app with middleware.py's layers
    metrics.py     /metrics through prometheus-client
    cli.py         the wavllm-serve command; SIGTERM drains and exits 0
    static/        the page at / (plain HTML + JS, no build step, nothing loaded from elsewhere)
The benchmark (continuous against batch-at-a-time under Poisson arrivals) is bench/serve.py
(``wavllm-bench-serve``), the load and fault run bench/serve_faults.py.

Why FastAPI + uvicorn: it is the stack the OpenAI-compatible servers people already run speech LLMs
behind use (vLLM, SGLang), well kept, ASGI, so one event loop holds many waiting or streaming clients
while a single worker thread owns the model; server-sent events are a ``StreamingResponse`` that
is cancelled when its client disconnects; multipart uploads come from python-multipart. Flask
(WSGI) would need a thread per waiting client and has no disconnect signal; aiohttp would do but
is its own framework; Gradio pulls a large front end and speaks its own API, not OpenAI's.
Install with ``pip install -e ".[serve]"``.
"""
