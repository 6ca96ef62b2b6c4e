"""``task.*``: the options of the ``wavllm_instruction`` task (tasks/instruction.py), each with its help."""
from dataclasses import dataclass, field
from typing import List

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from omegaconf import II

from ..data.encoder_cache import STORE_DTYPES
from ..data.manifest_formats import FORMATS
from ..data.prompt_template import DEFAULT_SYSTEM_PROMPT
from ..decoding.options import DECODE_PATHS


@dataclass
class WavLLMInstructionConfig(FairseqDataclass):
    """The ``task.*`` options of ``wavllm_instruction``: data, curriculum, template and decoding."""

    data: str = field(
        default="",
        metadata={"help": "folder of instruction manifests (<split>.tsv); audio paths in them are relative to it "
                          "unless task.audio_root is set"})
    audio_root: str = field(
        default="",
        metadata={"help": "folder the manifests' relative audio paths start from, as the reference's audio_root (a "
                          "relative folder: from the working directory; give fairseq-hydra-train an absolute one, "
                          "Hydra may change directory); empty = each manifest's own folder"})
    manifest_format: ChoiceEnum(list(FORMATS)) = field(
        default="auto",
        metadata={"help": "how manifests are read (data/manifest_formats.py): auto = by the first line: a fairseq "
                          "wav2vec/HuBERT manifest, a speech_to_text TSV, else an instruction manifest (\\n \\t "
                          "\\\\ escapes read); instruction; reference = the instruction columns read literally, as "
                          "the reference's csv QUOTE_NONE reader reads its training data; wav2vec; s2t"})
    prompt_pool: str = field(
        default="",
        metadata={"help": "prompts of rows that have none (wav2vec/HuBERT manifests, speech_to_text TSVs): a shipped "
                          "pool's name (asr.seen, st.unseen; it also names the rows' task) or a file of one prompt per "
                          "line; each row's prompt is chosen by its id; empty = the seen pool of each row's task"})
    tokenizer_dir: str = field(
        default="",
        metadata={"help": "folder holding the LLaMA tokenizer.model; empty = model.llama_path"})
    train_manifests: str = field(
        default="",
        metadata={"help": "comma-separated training manifests (names under data/, without .tsv) when no curriculum YAML"
                          " is given"})
    train_weights: str = field(
        default="",
        metadata={"help": "comma-separated sampling weights for train_manifests (empty = temperature sampling)"})
    sampling_temperature: float = field(
        default=1.0,
        metadata={"help": "temperature over corpus sizes when no weights are given (1 = proportional, "
                          "large = uniform)"})
    curriculum: str = field(
        default="",
        metadata={"help": "YAML with corpora and phases (weights or temperature from a start_update); relative paths "
                          "resolve against data/"})
    updates_per_epoch: int = field(
        default=1000,
        metadata={"help": "length of a virtual training epoch (the curriculum draws batches forever)"})
    max_audio_seconds: float = field(
        default=0.0,
        metadata={"help": "longest clip accepted in seconds (longer: error, or skip with skip_bad_rows); 0 = no limit "
                          "(default): clips over Whisper's 30 s run window by window, as the reference does, and only a"
                          " row whose prompt + speech + answer exceed the LLM context is refused"})
    max_text_positions: int = field(
        default=0,
        metadata={"help": "context limit for prompt + speech + answer (0 = the LLM's max_position_embeddings)"})
    skip_bad_rows: bool = field(
        default=False,
        metadata={"help": "skip (and count in the log) bad rows and unreadable audio instead of stopping "
                          "with an error"})
    check_audio_on_load: bool = field(
        default=True,
        metadata={"help": "read every audio header when a manifest loads (true lengths, missing files found before "
                          "training)"})
    system_prompt: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "the system prompt of the chat template"})
    chat_template: ChoiceEnum(["reference", "tokenizer"]) = field(
        default="reference",
        metadata={"help": "reference: the reference implementation's LLaMA-2 template (token-exact with the released "
                          "model); tokenizer: the LLM tokenizer's own chat template (tokenizer_config.json), the speech"
                          " span inside the first user turn, for another chat-tuned LLM (chat_template.py)"})
    prompt_augment: bool = field(
        default=False,
        metadata={"help": "instruction augmentation on the training split: single-task speech prompts get words dropped"
                          " (one word only that task's prompts use always stays) and words shared by 3+ tasks inserted,"
                          " so the model keys on task words (prompt_augment.py; not in the paper; toy runs in"
                          " examples/wavllm/toy/RESULTS.md)"})
    max_len_per_task: str = field(
        default="",
        metadata={"help": "decoding length caps per task, e.g. 'sv:20,er:20,asr:120' (tokens)"})
    loop_guard_ngram: int = field(
        default=4,
        metadata={"help": "decoding: stop a hypothesis whose tail repeats an n-gram (n <= this) 3 times; 0 = off"})
    repetition_penalty: float = field(
        default=1.0,
        metadata={"help": "decoding: CTRL-style repetition penalty (1 = off)"})
    max_len_counts_prompt: bool = field(
        default=False,
        metadata={"help": "decoding: --max-len-a/--max-len-b also count the instruction tokens after the speech span "
                          "(all but their first), as the reference's generator counts the prompt it forces; default "
                          "off: --max-len-b is the answer's own budget, whatever the instruction's length"})
    decode_path: ChoiceEnum(list(DECODE_PATHS)) = field(
        default="auto",
        metadata={"help": "decoding: auto = static cache + CUDA graphs on a GPU, dynamic cache on a CPU (the faster "
                          "on each); static / dynamic force one (both give the same tokens in float32)"})
    compile_decode_step: bool = field(
        default=False,
        metadata={"help": "decoding: torch.compile the static path's layer step (captured as a CUDA graph on a "
                          "GPU; fused kernels; compiling takes seconds per process and slot-count shape)"})
    encoder_cache: str = field(
        default="",
        metadata={"help": "folder of cached frozen-encoder outputs per clip (filled on first use, or ahead of time by "
                          "wavllm-cache-encoders); training, validation and decoding read it; empty = encode live"})
    encoder_cache_dtype: ChoiceEnum(list(STORE_DTYPES)) = field(
        default="float16",
        metadata={"help": "what the encoder cache stores: float16 (half the bytes, outputs rounded once) or float32 "
                          "(the live numbers exactly)"})
    seed: int = II("common.seed")
    update_freq: List[int] = II("optimization.update_freq")
