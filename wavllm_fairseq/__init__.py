"""WavLLM (arXiv 2404.00656) as a fairseq user-dir plugin.

``--user-dir wavllm_fairseq`` imports this package, which registers the ``wavllm_instruction`` task,
the ``wavllm`` model (architectures ``wavllm_7b``, ``wavllm_small``, ``wavllm_small_real``, ``wavllm_tiny``)
and the ``wavllm_cross_entropy`` criterion. ``from wavllm_fairseq import WavLLM`` is the Python API.
Importing it changes nothing in fairseq: the few fixes to fairseq's own code are listed in
tasks/fairseq_fixes.py and applied when the task is set up.

Subpackages by role: ``models`` (config, architectures, encoders, adapters, LoRA, the registered model),
``tasks``, ``criterions``, ``data`` (manifests, audio, templates, tokenizer, dataset, curriculum),
``decoding`` (generator and key/value caches), ``evaluation`` (scoring, t-SNE), ``tools`` (converters and
inspectors behind console scripts), ``bench`` (benchmarks, GPU check), ``serve`` (HTTP server) and ``toy``
(the synthetic corpus and stand-in backbones of the embedded default).
"""
from . import tasks, criterions, models  # noqa: F401  (registration with fairseq)

__version__ = "0.1.0"


def __getattr__(name):  # lazy: the hub pulls in audio I/O and the generator
    if name == "WavLLM":
        from .hub import WavLLM

        return WavLLM
    raise AttributeError(name)
