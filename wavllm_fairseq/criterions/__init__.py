"""fairseq criterions: ``wavllm_cross_entropy`` (cross entropy on the answer tokens only)."""
from . import cross_entropy  # noqa: F401  (registers the criterion)
