"""The LLM's tokenizer, and a fairseq Dictionary whose ids are the tokenizer's ids.

Two kinds, one interface (``encode``/``decode``, ``bos_id``/``eos_id``/``pad_id``/``unk_id``, ``pieces``):

* ``LlamaTokenizer``: a sentencepiece ``tokenizer.model`` (LLaMA-2), read with sentencepiece itself as
  the reference implementation does, so the template's ids are the reference's. ``<unk>`` = 0,
  ``<s>`` = 1, ``</s>`` = 2 and no padding token: padding uses ``<unk>`` (0), which is never attended
  to nor scored (masks carry the lengths).
* ``HFTokenizer``: any other LLM folder's tokenizer (``tokenizer.json``: the BPE of LLaMA-3, SmolLM2,
  Qwen2, ...) through ``transformers``' ``AutoTokenizer``; bos/eos/pad/unk are the tokenizer's own
  (see ``HFTokenizer`` for tokenizers that lack some), and its chat template is available to
  ``chat_template.py``.

``load_tokenizer`` (and ``LlamaTokenizer.from_dir``) picks the kind from the folder. ``LlamaDictionary``
lists the pieces in id order, so the ids fairseq prints in ``H-`` lines and the ids the LLM embeds are
the same; when the LLM's embedding has more rows than the tokenizer has tokens (``vocab_size`` in the
folder's config.json, e.g. Qwen2's padding to a multiple of 128), the dictionary gets placeholder
symbols up to that size. ``SentencePieceDecoder`` is what fairseq-generate uses to turn the
space-joined pieces back into text, for either kind.
"""
import io
import json
import os
from typing import Iterable, List, Optional, Sequence

import sentencepiece as spm
from fairseq.data import Dictionary
from transformers import AutoTokenizer

from ..errors import WavLLMInputError

TOKENIZER_FILE = "tokenizer.model"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def config_vocab_size(directory: str) -> int:
    """``vocab_size`` of the LLM folder's config.json.

    Args:
        directory (str): the LLM folder.

    Returns:
        int: the LLM's embedding rows (0 when there is no readable config.json).
    """
    cfg = os.path.join(directory, "config.json")
    if not os.path.isfile(cfg):
        return 0
    try:
        with open(cfg) as f:
            return int(json.load(f).get("vocab_size") or 0)
    except (ValueError, TypeError):
        return 0


def load_tokenizer(directory: str):
    """The tokenizer of an LLM folder: ``tokenizer.model`` (sentencepiece, LLaMA-2) -> ``LlamaTokenizer``;
    otherwise ``tokenizer.json`` / ``tokenizer_config.json`` -> ``HFTokenizer`` (AutoTokenizer).

    Args:
        directory (str): the LLM folder, or a sentencepiece ``.model`` file.

    Returns:
        LlamaTokenizer or HFTokenizer: the tokenizer (``model_vocab_size`` from the folder's config.json).

    Raises:
        WavLLMInputError: naming the folder, when it holds no tokenizer.
    """
    if directory.endswith(".model"):
        return LlamaTokenizer(directory)
    if os.path.isfile(os.path.join(directory, TOKENIZER_FILE)):
        tok = LlamaTokenizer(os.path.join(directory, TOKENIZER_FILE))
    elif any(os.path.isfile(os.path.join(directory, f)) for f in HF_TOKENIZER_FILES):
        tok = HFTokenizer(directory)
    else:
        raise WavLLMInputError(f"no tokenizer in {directory!r}: expected {TOKENIZER_FILE} (sentencepiece) or "
                               f"{' / '.join(HF_TOKENIZER_FILES)} (a Hugging Face tokenizer) in the LLM folder",
                               file=directory, reason="missing")
    tok.model_vocab_size = config_vocab_size(directory)
    return tok


class _Tokenizer:
    """What both tokenizers share: special ids around ``_encode`` and ``decode``'s filtering; subclasses
    give ``_encode(text)``, ``_decode(ids)`` and ``__len__``."""

    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_dir(cls, directory: str):
        """``load_tokenizer(directory)``: a sentencepiece or a Hugging Face tokenizer, by what the folder holds.

        Args:
            directory (str): the LLM folder.

        Returns:
            LlamaTokenizer or HFTokenizer: the tokenizer.
        """
        return load_tokenizer(directory)

    @property
    def vocab_size(self) -> int:
        """The tokenizer's number of ids."""
        return len(self)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> List[int]:
        """Text -> ids, without special tokens unless asked.

        Args:
            text (str): the text ('' gives no ids).
            bos (bool): start with bos.
            eos (bool): end with eos.

        Returns:
            List[int]: the ids.
        """
        ids = self._encode(text) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; stops at the first eos and drops bos, padding and ids outside the vocabulary.

        Args:
            ids (Iterable[int]): token ids (ints or 0-d tensors).

        Returns:
            str: the text.
        """
        out = []
        n = len(self)
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i in (self.bos_id, self.pad_id) or i < 0 or i >= n:
                continue
            out.append(i)
        return self._decode(out)


class LlamaTokenizer(_Tokenizer):
    """Thin wrapper over a sentencepiece model with LLaMA's special ids.

    Args:
        model_path (str): the ``tokenizer.model`` file.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise WavLLMInputError(f"LLaMA tokenizer not found: {model_path} (expected the {TOKENIZER_FILE} of the "
                                   "LLaMA directory)", file=model_path, reason="missing")
        self.path = model_path
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with little context
            raise WavLLMInputError(f"cannot read the sentencepiece model: {e}", file=model_path,
                                   reason="corrupt") from e
        self.bos_id = self.sp.bos_id()
        self.eos_id = self.sp.eos_id()
        self.unk_id = self.sp.unk_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise WavLLMInputError("the sentencepiece model has no <s> / </s> ids; a LLaMA tokenizer has both",
                                   file=model_path, reason="bad_tokenizer")
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id
        self.model_vocab_size = 0  # the LLM's embedding rows when known (load_tokenizer reads config.json)

    def __len__(self) -> int:
        return self.sp.GetPieceSize()

    def _encode(self, text: str) -> List[int]:
        return list(self.sp.EncodeAsIds(text))

    def _decode(self, ids: List[int]) -> str:
        return self.sp.DecodeIds(ids)

    def piece(self, i: int) -> str:
        """The piece of id ``i``."""
        return self.sp.IdToPiece(int(i))

    def pieces(self) -> List[str]:
        """Every piece, in id order."""
        return [self.sp.IdToPiece(i) for i in range(len(self))]

    def text_to_pieces(self, text: str) -> List[str]:
        """The pieces ``text`` encodes to."""
        return list(self.sp.EncodeAsPieces(text))

    def pieces_to_text(self, pieces: Sequence[str]) -> str:
        """The text of a sequence of pieces."""
        return self.sp.DecodePieces(list(pieces))


class HFTokenizer(_Tokenizer):
    """A ``transformers`` tokenizer (AutoTokenizer, local files only) with ``LlamaTokenizer``'s interface.

    Special ids are the tokenizer's own. A tokenizer without a bos token (Qwen2) starts sequences with
    its eos token, the document separator it was trained with; without a pad token, padding is the
    unk token or else eos (padding is masked, never attended to nor scored). Pieces that fairseq's
    space-joined strings cannot carry (empty, or containing whitespace) are named ``<id_N>``.

    Args:
        directory (str): the tokenizer's folder (read with ``local_files_only``).
    """

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise WavLLMInputError(f"tokenizer folder not found: {directory}", file=directory, reason="missing")
        self.path = os.path.abspath(directory)
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except Exception as e:
            raise WavLLMInputError(f"cannot load the tokenizer with AutoTokenizer ({type(e).__name__}: {e})",
                                   file=directory, reason="bad_tokenizer") from e
        hf = self.hf
        if hf.eos_token_id is None:
            raise WavLLMInputError("the tokenizer has no eos token (tokenizer_config.json's eos_token); answers "
                                   "end with it", file=directory, reason="bad_tokenizer")
        self.eos_id = int(hf.eos_token_id)
        self.bos_id = int(hf.bos_token_id) if hf.bos_token_id is not None else self.eos_id
        self.unk_id = int(hf.unk_token_id) if hf.unk_token_id is not None else None
        self.pad_id = next(int(i) for i in (hf.pad_token_id, hf.unk_token_id, hf.eos_token_id) if i is not None)
        if self.unk_id is None:
            self.unk_id = self.pad_id
        self.model_vocab_size = 0
        self._pieces = self._safe_pieces()
        self._piece_ids = {p: i for i, p in enumerate(self._pieces)}

    def _safe_pieces(self) -> List[str]:
        out = []
        for i, p in enumerate(self.hf.convert_ids_to_tokens(list(range(len(self.hf))))):
            out.append(p if p and not any(c.isspace() for c in p) else f"<id_{i}>")
        return out

    @property
    def chat_template(self) -> Optional[str]:
        """The tokenizer's chat template (jinja), if it has one."""
        return getattr(self.hf, "chat_template", None)

    def __len__(self) -> int:
        return len(self.hf)

    def _encode(self, text: str) -> List[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def _decode(self, ids: List[int]) -> str:
        """Other special tokens are dropped too."""
        return self.hf.decode(ids, skip_special_tokens=True)

    def piece(self, i: int) -> str:
        """The (space-free) piece of id ``i``."""
        return self._pieces[int(i)]

    def pieces(self) -> List[str]:
        """Every piece, in id order."""
        return list(self._pieces)

    def text_to_pieces(self, text: str) -> List[str]:
        """The pieces ``text`` encodes to."""
        return [self._pieces[i] for i in self.encode(text)]

    def pieces_to_text(self, pieces: Sequence[str]) -> str:
        """The text of a sequence of pieces (unknown pieces and special tokens dropped)."""
        ids = [self._piece_ids[p] for p in pieces if p in self._piece_ids]
        return self.hf.decode(ids, skip_special_tokens=True)


class LlamaDictionary(Dictionary):
    """fairseq Dictionary with exactly the tokenizer's ids (no extra specials prepended).

    Args:
        pieces (Sequence[str]): the symbols, in id order.
        bos, eos, unk, pad (int): the special ids.
    """

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
    def from_tokenizer(cls, tok) -> "LlamaDictionary":
        """The tokenizer's pieces in id order, padded with ``<unused_N>`` up to the LLM's embedding rows.

        Args:
            tok (LlamaTokenizer or HFTokenizer): the tokenizer (``model_vocab_size``: the LLM's rows, or 0).

        Returns:
            LlamaDictionary: the dictionary.
        """
        pieces = tok.pieces()
        extra = max(0, int(getattr(tok, "model_vocab_size", 0) or 0) - len(pieces))
        pieces += [f"<unused_{len(pieces) + i}>" for i in range(extra)]
        return cls(pieces, tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id)

    def unk_string(self, escape=False):
        """fairseq's: the unk symbol (``<<unk>>`` escaped)."""
        return "<<unk>>" if escape else self.unk_word


class SentencePieceDecoder:
    """fairseq-generate's ``bpe``: space-joined pieces (``Dictionary.string``) -> text (either tokenizer kind).

    Args:
        tok (LlamaTokenizer or HFTokenizer): the tokenizer.
    """

    def __init__(self, tok):
        self.tok = tok

    def encode(self, x: str) -> str:
        """Text -> space-joined pieces."""
        return " ".join(self.tok.text_to_pieces(x))

    def decode(self, x: str) -> str:
        """Space-joined pieces -> text (stripped)."""
        pieces = [p for p in x.split(" ") if p]
        return self.tok.pieces_to_text(pieces).strip()

    def is_beginning_of_word(self, x: str) -> bool:
        """Whether piece ``x`` starts a word."""
        return x.startswith(("\u2581", "\u0120"))  # sentencepiece's word start, byte-level BPE's space


def train_sentencepiece(texts: Iterable[str], out_dir: str, vocab_size: int = 512, seed_sentences: int = 100000,
                        model_type: str = "bpe") -> LlamaTokenizer:
    """Train a LLaMA-style sentencepiece model (unk 0, bos 1, eos 2, no pad, byte fallback) -> ``out_dir``.

    Used by the toy stage 0 and by tests; real runs use the LLaMA directory's own ``tokenizer.model``.

    Args:
        texts (Iterable[str]): training sentences (blank ones skipped).
        out_dir (str): where ``tokenizer.model`` is written (atomically).
        vocab_size (int): the target vocabulary (a soft limit).
        seed_sentences (int): sentencepiece's ``input_sentence_size``.
        model_type (str): ``bpe`` or ``unigram``.

    Returns:
        LlamaTokenizer: the trained tokenizer.
    """
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


def describe(tok) -> str:
    """One line naming a tokenizer (path, size, special ids) for logs.

    Args:
        tok (Optional[LlamaTokenizer or HFTokenizer]): the tokenizer.

    Returns:
        str: the description.
    """
    if tok is None:
        return "no tokenizer"
    return f"{tok.path} ({len(tok)} pieces, bos={tok.bos_id} eos={tok.eos_id} pad={tok.pad_id})"
