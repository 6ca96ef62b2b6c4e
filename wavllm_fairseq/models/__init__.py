"""The WavLLM model: its config, named architectures, encoders, adapters, LoRA, prompt adapter and what trains."""
from . import wavllm  # noqa: F401  (registers the `wavllm` model and its architectures)
