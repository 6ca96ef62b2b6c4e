"""fairseq tasks: ``wavllm_instruction`` (instruction manifests -> batches; training and decoding)."""
from . import instruction  # noqa: F401  (registers the task)
