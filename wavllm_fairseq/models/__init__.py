"""The WavLLM model: config, named architectures, front end, encoders, LLM, adapters, LoRA, prompt adapter,
what trains and what checkpoints hold."""
from . import wavllm  # noqa: F401  (registers the `wavllm` model and its architectures)
