"""The LLaMA sentencepiece tokenizer, and a fairseq Dictionary whose ids are the tokenizer's ids.

LLaMA-2's ``tokenizer.model`` has ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 and no padding token;
padding uses ``<unk>`` (0), which is never attended to nor scored (masks carry the lengths).
``LlamaDictionary`` lists the sentencepiece pieces in id order, so the ids fairseq prints in ``H-``
lines and the ids the LLM embeds are the same, and ``SentencePieceDecoder`` is what fairseq-generate
uses to turn the space-joined pieces back into text.
"""
import os
from typing import Iterable, List, Optional, Sequence

from fairseq.data import Dictionary

from .errors import WavLLMInputError

TOKENIZER_FILE = "tokenizer.model"


class LlamaTokenizer:
    """Thin wrapper over a sentencepiece model with LLaMA's special ids."""

    def __init__(self, model_path: str):
        import sentencepiece as spm

        if not os.path.isfile(model_path):
            raise WavLLMInputError(f"LLaMA tokenizer not found: {model_path} (expected the {TOKENIZER_FILE} of the "
                                   "LLaMA directory)", file=model_path, reason="missing")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context
            raise WavLLMInputError(f"cannot read the sentencepiece model: {e}", file=model_path, reason="corrupt") from e
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise WavLLMInputError("the sentencepiece model has no <s> / </s> ids; a LLaMA tokenizer has both",
                                   file=model_path, reason="bad_tokenizer")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

    @classmethod
    def from_dir(cls, directory: str) -> "LlamaTokenizer":
        path = directory if directory.endswith(".model") else os.path.join(directory, TOKENIZER_FILE)
        return cls(path)

    def __len__(self) -> int:
        return self.sp.GetPieceSize()

    @property
    def vocab_size(self) -> int:
        return len(self)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        ids = list(self.sp.EncodeAsIds(text)) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at the first ``</s>`` and drops ``<s>`` and padding."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id) or i < 0:
                continue
            out.append(i)
        return self.sp.DecodeIds(out)

    def piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    def pieces(self) -> List[str]:
        return [self.sp.IdToPiece(i) for i in range(len(self))]


class LlamaDictionary(Dictionary):
    """fairseq Dictionary with exactly the sentencepiece ids (no extra specials prepended)."""

    def __init__(self, pieces: Sequence[str], bos: int, eos: int, unk: int, pad: int):
        # Dictionary.__init__ would add its own <s>/<pad>/</s>/<unk> at 0..3; build the tables directly
        self.symbols = list(pieces)
        self.count = [1] * len(self.symbols)
        self.indices = {}
        for i, s in enumerate(self.symbols):
            self.indices.setdefault(s, i)
        self.bos_word, self.eos_word, self.unk_word = self.symbols[bos], self.symbols[eos], self.symbols[unk]
        self.pad_word = self.symbols[pad]
        self.bos_index, self.eos_index, self.unk_index, self.pad_index = bos, eos, unk, pad
        self.nspecial = 3
        self.extra_special_symbols = None

    @classmethod
    def from_tokenizer(cls, tok: LlamaTokenizer) -> "LlamaDictionary":
        return cls(tok.pieces(), tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)

    def unk_string(self, escape=False):
        return "<<unk>>" if escape else self.unk_word


class SentencePieceDecoder:
    """fairseq-generate's ``bpe``: space-joined pieces (``Dictionary.string``) -> text."""

    def __init__(self, tok: LlamaTokenizer):
        self.tok = tok

    def encode(self, x: str) -> str:
        return " ".join(self.tok.sp.EncodeAsPieces(x))

    def decode(self, x: str) -> str:
        pieces = [p for p in x.split(" ") if p]
        return self.tok.sp.DecodePieces(pieces).strip()

    def is_beginning_of_word(self, x: str) -> bool:
        return x.startswith("\u2581")


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = 512, seed_sentences: int = 100000,
                        model_type: str = "bpe") -> LlamaTokenizer:
    """Train a LLaMA-style sentencepiece model (unk 0, bos 1, eos 2, no pad, byte fallback) -> ``out_dir``.

    Used by the toy stage 0 and by tests; real runs use the LLaMA directory's own ``tokenizer.model``.
    """
    import io

    import sentencepiece as spm

    os.makedirs(out_dir, exist_ok=True)
    lines = [t.strip() for t in texts if t and t.strip()]
    if not lines:
        raise WavLLMInputError("no text to train a tokenizer on")
    model = io.BytesIO()
    spm.SentencePieceTrainer.Train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type=model_type,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, character_coverage=1.0,
        input_sentence_size=seed_sentences, shuffle_input_sentence=False, num_threads=1,
        hard_vocab_limit=False, minloglevel=2, split_digits=True, normalization_rule_name="identity")
    path = os.path.join(out_dir, TOKENIZER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, path)
    return LlamaTokenizer(path)


def describe(tok: Optional[LlamaTokenizer]) -> str:
    if tok is None:
        return "no tokenizer"
    return f"{tok.path} ({len(tok)} pieces, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id})"
