"""fairseq criterions: ``wavllm_cross_entropy`` (cross entropy on the answer tokens only) and ``wavllm_ctc_align``
(CTC from the speech embeddings to the LLM's token embeddings, an optional warm-up before stage 1)."""
from . import cross_entropy  # noqa: F401  (registers the criterion)
from . import ctc_align  # noqa: F401  (registers the criterion)
