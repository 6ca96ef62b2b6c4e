"""A CTranslate2 Whisper model folder -> a complete Hugging Face Whisper folder.

CTranslate2 (``ct2-transformers-converter``, faster-whisper's and Systran's releases) stores Whisper as
``model.bin`` (its own binary format: a header, then named variables ``encoder/layer_0/self_attention/
linear_0/weight`` ..., then aliases), ``config.json`` (suppressed ids, alignment heads, language ids) and
``tokenizer.json`` / ``vocabulary.txt``. ``convert_ct2_whisper`` reads it back into a
``WhisperForConditionalGeneration`` state dict, undoing CTranslate2's fusions (self-attention q/k/v in
one ``linear_0`` whose k bias is zero; cross-attention k/v in one ``linear_1``) and its int8 per-row
scales when the model was quantised, and writes a folder that ``from_pretrained``, ``AutoTokenizer``
and ``WhisperProcessor`` load: weights + config.json + generation_config.json + tokenizer files +
preprocessor_config.json. Run ``python -m wavllm_fairseq.tools.ct2_whisper CT2_DIR OUT_DIR``.

The mapping is exactly the inverse of ``ctranslate2.converters.transformers.WhisperLoader``; the test
converts a random HF Whisper with that converter and back and compares every tensor.
"""
import argparse
import json
import os
import re
import struct
from typing import Dict, Optional, Sequence, Tuple

import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperTokenizer
from transformers.generation import GenerationConfig

from ..errors import CheckpointError
from ..models.config import DTYPE_NAMES, DTYPES

# CTranslate2's DataType enum (include/ctranslate2/types.h, specs/model_spec.py _dtype_to_type_id)
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}
_N_MELS = 80
_SAMPLE_RATE = 16000


def read_ct2_model(path: str) -> Tuple[str, Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a CTranslate2 ``model.bin`` (binary versions 5 and 6).

    Args:
        path (str): the file.

    Returns:
        Tuple[str, Dict[str, torch.Tensor], Dict[str, str]]: (spec name, {variable: tensor}, {alias: variable}).
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CheckpointError(f"cannot read the CTranslate2 model: {e}", file=path, reason="missing") from e
    off = 0

    def unpack(fmt):
        nonlocal off
        (v,) = struct.unpack_from(fmt, data, off)
        off += struct.calcsize(fmt)
        return v

    def string():
        nonlocal off
        n = unpack("H")
        s = data[off: off + n - 1].decode("utf-8")
        off += n
        return s

    try:
        version = unpack("I")
        if version not in (5, 6):
            raise CheckpointError(f"CTranslate2 binary version {version} is not supported (5 or 6)", file=path,
                                  reason="mismatch")
        spec = string()
        unpack("I")  # spec revision
        variables: Dict[str, torch.Tensor] = {}
        for _ in range(unpack("I")):
            name = string()
            shape = [unpack("I") for _ in range(unpack("B"))]
            dtype = _CT2_DTYPES[unpack("B")]
            nbytes = unpack("I")
            raw = bytearray(data[off: off + nbytes])
            off += nbytes
            t = torch.frombuffer(raw, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
            variables[name] = t.reshape(shape) if shape else t.reshape(())
        aliases = {string(): string() for _ in range(unpack("I"))}
    except (struct.error, KeyError, RuntimeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"truncated or corrupt CTranslate2 model.bin ({type(e).__name__}: {e})", file=path,
                              reason="corrupt") from e
    return spec, variables, aliases


def _float(variables: Dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A weight as a float tensor; int8 weights are divided by their per-row ``weight_scale``."""
    t = variables[name]
    if t.dtype == torch.int8:
        scale = variables[name[: -len("weight")] + "weight_scale"].float()
        return t.float() / scale.reshape(-1, *([1] * (t.dim() - 1)))
    return t


def _linear(v, ct2: str, hf: str, out: Dict[str, torch.Tensor], bias: bool = True) -> None:
    out[hf + ".weight"] = _float(v, ct2 + "/weight")
    if bias:
        out[hf + ".bias"] = v[ct2 + "/bias"]


def _norm(v, ct2: str, hf: str, out: Dict[str, torch.Tensor]) -> None:
    out[hf + ".weight"] = v[ct2 + "/gamma"]
    out[hf + ".bias"] = v[ct2 + "/beta"]


def _split(v, ct2: str, parts: Tuple[str, ...], hf: str, out: Dict[str, torch.Tensor], d: int) -> None:
    """A fused linear (rows [q; k; v] or [k; v]) -> separate projections; HF Whisper's k_proj has no bias."""
    w, b = _float(v, ct2 + "/weight"), v[ct2 + "/bias"]
    for i, name in enumerate(parts):
        out[f"{hf}.{name}.weight"] = w[i * d: (i + 1) * d]
        if name != "k_proj":
            out[f"{hf}.{name}.bias"] = b[i * d: (i + 1) * d]


def whisper_state_dict(variables: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """CTranslate2 WhisperSpec variables -> a WhisperForConditionalGeneration state dict.

    Args:
        variables (Dict[str, torch.Tensor]): the spec's variables, aliases resolved.

    Returns:
        Tuple[Dict[str, torch.Tensor], Dict[str, int]]: the state dict and the ``WhisperConfig`` sizes.
    """
    v = variables
    d = v["encoder/conv1/weight"].shape[0]
    n_enc = len({k.split("/")[1] for k in v if re.match(r"encoder/layer_\d+/", k)})
    n_dec = len({k.split("/")[1] for k in v if re.match(r"decoder/layer_\d+/", k)})
    sizes = dict(d_model=d, encoder_layers=n_enc, decoder_layers=n_dec,
                 encoder_attention_heads=int(v["encoder/num_heads"]),
                 decoder_attention_heads=int(v["decoder/num_heads"]),
                 encoder_ffn_dim=v["encoder/layer_0/ffn/linear_0/weight"].shape[0],
                 decoder_ffn_dim=v["decoder/layer_0/ffn/linear_0/weight"].shape[0],
                 num_mel_bins=v["encoder/conv1/weight"].shape[1],
                 max_source_positions=v["encoder/position_encodings/encodings"].shape[0],
                 max_target_positions=v["decoder/position_encodings/encodings"].shape[0],
                 vocab_size=v["decoder/embeddings/weight"].shape[0])
    out: Dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{hf}.embed_positions.weight"] = v[f"{side}/position_encodings/encodings"]
        _norm(v, f"{side}/layer_norm", f"{hf}.layer_norm", out)
        for i in range(n_enc if side == "encoder" else n_dec):
            ct, h = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            _norm(v, f"{ct}/self_attention/layer_norm", f"{h}.self_attn_layer_norm", out)
            _split(v, f"{ct}/self_attention/linear_0", ("q_proj", "k_proj", "v_proj"), f"{h}.self_attn", out, d)
            _linear(v, f"{ct}/self_attention/linear_1", f"{h}.self_attn.out_proj", out)
            if side == "decoder":
                _norm(v, f"{ct}/attention/layer_norm", f"{h}.encoder_attn_layer_norm", out)
                _linear(v, f"{ct}/attention/linear_0", f"{h}.encoder_attn.q_proj", out)
                _split(v, f"{ct}/attention/linear_1", ("k_proj", "v_proj"), f"{h}.encoder_attn", out, d)
                _linear(v, f"{ct}/attention/linear_2", f"{h}.encoder_attn.out_proj", out)
            _norm(v, f"{ct}/ffn/layer_norm", f"{h}.final_layer_norm", out)
            _linear(v, f"{ct}/ffn/linear_0", f"{h}.fc1", out)
            _linear(v, f"{ct}/ffn/linear_1", f"{h}.fc2", out)
    for conv in ("conv1", "conv2"):
        out[f"model.encoder.{conv}.weight"] = _float(v, f"encoder/{conv}/weight")
        out[f"model.encoder.{conv}.bias"] = v[f"encoder/{conv}/bias"]
    out["model.decoder.embed_tokens.weight"] = _float(v, "decoder/embeddings/weight")
    return out, sizes


def _token_id(tokenizer, token: str) -> int:
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id and token != tokenizer.unk_token:
        raise CheckpointError(f"the Whisper tokenizer has no {token} token", reason="mismatch")
    return int(i)


def convert_ct2_whisper(src: str, out: str, dtype: torch.dtype = torch.float32) -> str:
    """Write the Hugging Face folder of a CTranslate2 Whisper model.

    Args:
        src (str): the CTranslate2 folder (``model.bin``, ``config.json``, ``tokenizer.json``).
        out (str): the folder to write.
        dtype (torch.dtype): the weights' dtype in ``out``.

    Returns:
        str: ``out``.
    """
    model_bin = os.path.join(src, "model.bin")
    spec, variables, aliases = read_ct2_model(model_bin)
    if spec != "WhisperSpec":
        raise CheckpointError(f"{model_bin} holds a {spec}, not a CTranslate2 Whisper model", file=model_bin,
                              reason="mismatch")
    for alias, target in aliases.items():  # CTranslate2 stores identical tensors once (tied, or equal at init)
        variables.setdefault(alias, variables[target])
    state, sizes = whisper_state_dict(variables)
    tok_file = os.path.join(src, "tokenizer.json")
    if not os.path.isfile(tok_file):
        raise CheckpointError("the CTranslate2 folder has no tokenizer.json, needed for the HF tokenizer "
                              "(ct2-transformers-converter --copy_files tokenizer.json puts it there, as Systran's "
                              "releases have it)",
                              file=tok_file, reason="missing")
    special = "<|endoftext|>"
    tokenizer = WhisperTokenizer(tokenizer_file=tok_file, unk_token=special, bos_token=special, eos_token=special,
                                 pad_token=special)
    ct2_cfg = {}
    if os.path.isfile(os.path.join(src, "config.json")):
        with open(os.path.join(src, "config.json")) as f:
            ct2_cfg = json.load(f)
    eot = _token_id(tokenizer, special)
    sot = _token_id(tokenizer, "<|startoftranscript|>")
    no_ts = _token_id(tokenizer, "<|notimestamps|>")
    lang_ids = list(ct2_cfg.get("lang_ids") or [])
    multilingual = sizes["vocab_size"] >= 51865  # openai's rule: English-only models have 51864 tokens
    config = WhisperConfig(**sizes, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
                           decoder_start_token_id=sot, suppress_tokens=ct2_cfg.get("suppress_ids"),
                           begin_suppress_tokens=ct2_cfg.get("suppress_ids_begin"), tie_word_embeddings=True,
                           architectures=["WhisperForConditionalGeneration"])
    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    state = {k: t.to(dtype).clone() for k, t in state.items()}  # clone: aliased tensors become separate
    state["proj_out.weight"] = state["model.decoder.embed_tokens.weight"]  # CTranslate2 aliases them too
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(f"CTranslate2 -> HF Whisper map incomplete: missing {missing[:10]}, unexpected "
                              f"{unexpected[:10]}", file=model_bin, reason="mismatch")
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    gen = GenerationConfig(
        decoder_start_token_id=sot, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
        max_length=sizes["max_target_positions"], no_timestamps_token_id=no_ts, is_multilingual=multilingual,
        suppress_tokens=ct2_cfg.get("suppress_ids"), begin_suppress_tokens=ct2_cfg.get("suppress_ids_begin"),
        alignment_heads=ct2_cfg.get("alignment_heads"), forced_decoder_ids=None if multilingual else [[1, no_ts]])
    if multilingual:  # the language tokens, by the tokenizer's names (<|en|> ...)
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in lang_ids}
        gen.task_to_id = {"transcribe": _token_id(tokenizer, "<|transcribe|>"),
                          "translate": _token_id(tokenizer, "<|translate|>")}
    model.generation_config = gen
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    WhisperFeatureExtractor(feature_size=sizes["num_mel_bins"], sampling_rate=_SAMPLE_RATE, hop_length=160,
                            chunk_length=30, n_fft=400).save_pretrained(out)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m wavllm_fairseq.tools.ct2_whisper CT2_DIR OUT_DIR`` on ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="CTranslate2 Whisper folder (model.bin, config.json, tokenizer.json)")
    p.add_argument("out", help="output Hugging Face folder")
    p.add_argument("--dtype", default="float32", choices=DTYPE_NAMES)
    args = p.parse_args(argv)
    convert_ct2_whisper(args.src, args.out, DTYPES[args.dtype])
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
