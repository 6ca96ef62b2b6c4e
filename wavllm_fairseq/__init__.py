"""WavLLM (arXiv 2404.00656) as a fairseq user-dir plugin.

``--user-dir wavllm_fairseq`` imports this package, which registers the ``wavllm_instruction`` task,
the ``wavllm`` model (architectures ``wavllm_7b``, ``wavllm_small``, ``wavllm_tiny``) and the
``wavllm_cross_entropy`` criterion. ``from wavllm_fairseq import WavLLM`` is the Python API.
Importing it changes nothing in fairseq: the few fixes to fairseq's own code are listed in
fairseq_fixes.py and applied when the task is set up.
"""
import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import criterion, model, task  # noqa: E402,F401  (registration with fairseq)

__version__ = "0.1.0"


def __getattr__(name):  # lazy: the hub pulls in audio I/O and the generator
    if name == "WavLLM":
        from .hub import WavLLM

        return WavLLM
    raise AttributeError(name)
