"""Decoding options in one place: their names and defaults (:class:`DecodingOptions`), how fairseq-generate's
arguments and the task's decoding fields map onto them, the ``decode_path`` names and the per-task caps.

Every generator is built from here (``DecodingOptions(...).build(model, tgt_dict)``): the task's
``build_generator`` (fairseq-generate), the Python API, the server's engine and the benchmarks.
"""
import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from ..errors import WavLLMInputError
from .generator import WavLLMGenerator

# a decode-path option -> WavLLMGenerator(static=...): auto (None: static on a GPU, dynamic on a CPU)
_STATIC_FOR = {"auto": None, "static": True, "dynamic": False}
DECODE_PATHS = tuple(_STATIC_FOR)


def static_for(decode_path) -> Optional[bool]:
    """The generator's ``static`` flag for a ``decode_path`` option.

    Args:
        decode_path: one of :data:`DECODE_PATHS` (a string or a fairseq choice enum)

    Returns:
        Optional[bool]: None for "auto" (static on a GPU, dynamic on a CPU), True for "static", False for "dynamic"
    """
    name = str(decode_path)
    if name not in _STATIC_FOR:
        raise ValueError(f"decode path must be one of {DECODE_PATHS}, got {name!r}")
    return _STATIC_FOR[name]


def parse_task_lengths(text: str) -> Dict[str, int]:
    """Parse ``task.max_len_per_task``.

    Args:
        text (str): comma-separated ``TASK:TOKENS`` pairs, e.g. "sv:20,er:20,asr:120" (empty: none)

    Returns:
        Dict[str, int]: {task: max new tokens}; a malformed value raises ``WavLLMInputError`` saying which item
    """
    caps: Dict[str, int] = {}
    for item in filter(None, (p.strip() for p in (text or "").split(","))):
        name, sep, n = item.partition(":")
        if not sep or not name.strip() or not n.strip().isdigit() or int(n) < 1:
            raise WavLLMInputError(f"task.max_len_per_task={text!r}: {item!r} is not TASK:TOKENS with TOKENS a "
                                   "positive integer (e.g. 'sv:20,er:20,asr:120')")
        caps[name.strip()] = int(n)
    return caps


@dataclass
class DecodingOptions:
    """The options of a :class:`~wavllm_fairseq.decoding.generator.WavLLMGenerator`, with its defaults.

    Args:
        beam_size (int): beams per sentence (1: greedy or sampling)
        max_len_a (float): new tokens at most are ``max_len_a * prefix length + max_len_b``
        max_len_b (int): see ``max_len_a``
        min_len (int): ``</s>`` is banned before this many new tokens
        normalize_scores (bool): divide a hypothesis' score by its length ** ``len_penalty``
        len_penalty (float): see ``normalize_scores``
        temperature (float): softmax temperature of the scores (and of sampling); > 0
        sampling (bool): sample the next token instead of taking the most likely one
        sampling_topk (int): sample among this many most likely tokens (-1: all)
        sampling_topp (float): sample among the smallest set reaching this mass (-1: off)
        no_repeat_ngram_size (int): ban tokens that repeat an n-gram of this size (0: off)
        repetition_penalty (float): CTRL-style penalty on tokens already generated (1: off)
        loop_guard_ngram (int): stop a hypothesis whose tail repeats an n-gram (n <= this) 3 times (0: off)
        max_len_per_task (Optional[Dict[str, int]]): new tokens at most per task name (a batch's ``task_names``)
        nbest (int): hypotheses returned per sentence
        use_cache (bool): False recomputes the whole sequence every step (the reference for tests)
        static (Optional[bool]): the static cache path (None: on a CUDA device whose LLM it supports)
        cuda_graphs (Optional[bool]): capture the static step as CUDA graphs (None: on CUDA)
        compile_step (bool): ``torch.compile`` the static path's layer step
        ban_unk (bool): ban ``<unk>`` at every step, as the reference does
        max_len_counts_prompt (bool): the reference's length rule: ``max_len_a * prefix length + max_len_b``
            also counts the prompt tokens after the speech span but their first (``</SPEECH> {instruction}
            [/INST]``, which the reference's generator forces as a prefix inside its length), so a row's new
            tokens at most are that many fewer
    """

    beam_size: int = 1
    max_len_a: float = 0.0
    max_len_b: int = 200
    min_len: int = 1
    normalize_scores: bool = True
    len_penalty: float = 1.0
    temperature: float = 1.0
    sampling: bool = False
    sampling_topk: int = -1
    sampling_topp: float = -1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    loop_guard_ngram: int = 0
    max_len_per_task: Optional[Dict[str, int]] = None
    nbest: int = 1
    use_cache: bool = True
    static: Optional[bool] = None
    cuda_graphs: Optional[bool] = None
    compile_step: bool = False
    ban_unk: bool = True
    max_len_counts_prompt: bool = False

    @classmethod
    def from_fairseq_args(cls, args, task_cfg) -> "DecodingOptions":
        """fairseq-generate's options: the generation arguments (``--beam``, ``--max-len-b``, ``--sampling`` ...;
        fairseq's defaults where one is absent) and the task's decoding fields (``task.loop_guard_ngram``,
        ``repetition_penalty``, ``max_len_per_task``, ``decode_path``, ``compile_decode_step``,
        ``max_len_counts_prompt``).

        Args:
            args: fairseq's generation config (a namespace or an omegaconf node)
            task_cfg: the ``wavllm_instruction`` task config

        Returns:
            DecodingOptions: the options ``build_generator`` decodes with
        """
        return cls(beam_size=getattr(args, "beam", 1), max_len_a=getattr(args, "max_len_a", 0.0),
                   max_len_b=getattr(args, "max_len_b", 200), min_len=getattr(args, "min_len", 1),
                   normalize_scores=not getattr(args, "unnormalized", False), len_penalty=getattr(args, "lenpen", 1.0),
                   temperature=getattr(args, "temperature", 1.0), sampling=getattr(args, "sampling", False),
                   sampling_topk=getattr(args, "sampling_topk", -1),
                   sampling_topp=getattr(args, "sampling_topp", -1.0),
                   no_repeat_ngram_size=getattr(args, "no_repeat_ngram_size", 0),
                   repetition_penalty=task_cfg.repetition_penalty, loop_guard_ngram=task_cfg.loop_guard_ngram,
                   max_len_per_task=parse_task_lengths(task_cfg.max_len_per_task) or None,
                   nbest=getattr(args, "nbest", 1), static=static_for(task_cfg.decode_path),
                   compile_step=task_cfg.compile_decode_step,
                   max_len_counts_prompt=getattr(task_cfg, "max_len_counts_prompt", False))

    def build(self, models, tgt_dict) -> WavLLMGenerator:
        """A generator with these options.

        Args:
            models: the WavLLMModel, or fairseq's list of one
            tgt_dict: the target dictionary (``eos()``, ``pad()`` and, if it has one, ``unk()`` are read)

        Returns:
            WavLLMGenerator: the generator
        """
        return WavLLMGenerator(models, tgt_dict, **dataclasses.asdict(self))
