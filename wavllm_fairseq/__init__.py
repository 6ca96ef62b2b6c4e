"""WavLLM (arXiv 2404.00656) as a fairseq user-dir plugin.

``--user-dir wavllm_fairseq`` imports this package, which registers the ``wavllm_instruction`` task,
the ``wavllm`` model (architectures ``wavllm_7b``, ``wavllm_small``, ``wavllm_tiny``) and the
``wavllm_cross_entropy`` criterion. ``from wavllm_fairseq import WavLLM`` is the Python API.
"""
import os as _os

_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from . import criterion, model, task  # noqa: E402,F401  (registration with fairseq)
from .checkpoint_io import install_fairseq_checkpoint_guards as _guards  # noqa: E402
from .fairseq_compat import install_fairseq_cpu_fixes as _cpu_fixes  # noqa: E402

_guards()
_cpu_fixes()

__version__ = "0.1.0"


def __getattr__(name):  # lazy: the hub pulls in audio I/O and the generator
    if name == "WavLLM":
        from .hub import WavLLM

        return WavLLM
    raise AttributeError(name)
