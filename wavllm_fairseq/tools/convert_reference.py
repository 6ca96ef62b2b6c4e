"""Convert the reference implementation's released checkpoint into this plugin's checkpoint.

    wavllm-convert-reference-checkpoint SRC.pt DST.pt --llama-path DIR [--whisper-path DIR] [--wavlm-path DIR]

The reference (microsoft/SpeechT5, ``WavLLM/``) saves a fairseq checkpoint of its ``speechllm_model``
whose keys start with ``audio_encoder.`` (Whisper encoder + semantic adapter), ``wavlm_encoder.`` (WavLM +
acoustic adapter), ``wavlm_audio_proj.`` (the 4096 -> 4096 projector), ``audio_proj.`` (a 2048 -> 4096
projection it holds but does not use with WavLM on) and ``gpt_model.model_llama.`` (LLaMA in Meta's
layout with LoRA parameters ``wq_lora_A`` (D x R) / ``wq_lora_B`` (R x D) and, in stage 2, the prompt
adapter ``scale_fc_1`` / ``scale_fc_2`` / ``scale_weight_attention``).

Every source key is mapped by one rule of ``reference_keys.KEY_MAP``; anything else fails the conversion with
the list of unmatched keys. The frozen backbones (Whisper encoder, WavLM, LLaMA) are dropped from the output when
their local Hugging Face directory is given (the plugin reloads them from there, and the converter
first checks that the release's tensors equal the directory's), and converted into the output otherwise.
The converted state is then loaded *strictly* into the model built on the meta device, so a key or a
shape this plugin does not expect fails too. Nothing is loaded partially.

Layout changes:

* LoRA: ``x @ A @ B`` with ``A: (in, R)``, ``B: (R, out)`` becomes ``lora_B(lora_A(x))`` with
  ``lora_A.weight = A.T`` and ``lora_B.weight = B.T``.
* Rotary layout: Meta's LLaMA rotates interleaved pairs ``(2i, 2i+1)`` of each head, Hugging Face's
  ``LlamaForCausalLM`` rotates halves ``(i, i + head_dim/2)``; HF checkpoints therefore store ``wq`` and
  ``wk`` with their output rows permuted per head. The LoRA output of q and k gets the same permutation
  (its rows in ``lora_B``); v and o are not rotated and keep their order.
* LoRA scale: stage 1 uses ``alpha / R`` (read from the source checkpoint's task config, ``lora_alpha``
  and ``lora_r``, or given with ``--lora-alpha``; a recorded ``lora_r`` other than the tensors' rank is an
  error); stage 2 uses the prompt adapter's ``r`` with no ``alpha / R`` on top, as both implementations do
  (there the recorded ``lora_r`` is not checked).
* WavLM's weight-normed positional convolution: ``weight_g`` / ``weight_v`` (the names torch 2.0.1, which
  the reference pins, saves) become ``parametrizations.weight.original0`` / ``original1``, the names of
  today's module (a release saved by a later torch already has them).
* Stage-2 scale: the prompt adapter's ``r`` multiplies LoRA outputs feature by feature, and the
  release learnt it against Meta-ordered q/k outputs; the converted config sets
  ``lora_scale_layout=meta`` so q and k read ``r`` through the same row permutation.
* Bottleneck adapters: the reference computes ``x + LayerNorm(Up(GELU(Down(x))))``; the converted config
  sets ``bottleneck_norm=post`` (this plugin's default) so the math is the same.
* Inputs as the reference gave them (parity measured by ``examples/wavllm/scripts/parity_reference.py``):
  the prompt adapter reads '"' + instruction + '"' without ``<s>`` (this plugin's only adapter input),
  and decoding feeds ``<s>`` where " </SPEECH>" starts (``decode_bos_after_speech``), as the
  reference's generator does.

LoRA trained on other base weights than the ones loaded later decodes nonsense without any error,
hence the backbone check (``--no-check-backbones`` skips it).
"""
import argparse
import logging
import os
import re
import sys
import warnings
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence

import torch
from fairseq.dataclass.configs import FairseqConfig
from omegaconf import OmegaConf
from transformers import LlamaConfig, WavLMConfig, WhisperConfig

from ..errors import CheckpointError
from ..models.architectures import fill_from_arch
from ..models.checkpoint_io import torch_load
from ..models.config import DTYPE_NAMES, WavLLMConfig
from ..models.hf_folder import load_config, read_hf_state_dict
from ..models.wavllm import WavLLMModel
from ..tasks.instruction import WavLLMInstructionConfig
from .reference_keys import convert_state_dict

logger = logging.getLogger(__name__)

def _local_backbone_state(group: str, path: str) -> Dict[str, torch.Tensor]:
    """The directory's tensors under this plugin's names (``whisper.encoder.*``, ``wavlm.wavlm.*``, ``llm.*``)."""
    if group == "whisper":
        return {"whisper.encoder." + k: v
                for k, v in read_hf_state_dict(path, ("model.encoder.", "encoder.", "")).items()}
    if group == "wavlm":
        return {"wavlm.wavlm." + k: v for k, v in read_hf_state_dict(path, ("wavlm.", "")).items()}
    state = read_hf_state_dict(path, ("",))
    out = {}
    for k, v in state.items():
        k = re.sub(r"\.self_attn\.([qkvo]_proj)\.weight$", r".self_attn.\1.base.weight", k)
        out["llm." + k] = v
    if "llm.lm_head.weight" not in out and "llm.model.embed_tokens.weight" in out:
        out["llm.lm_head.weight"] = out["llm.model.embed_tokens.weight"]  # tied embeddings
    return out


def check_backbones(dropped: Dict[str, torch.Tensor], paths: Dict[str, str], atol: float = 1e-3,
                    rtol: float = 1e-2) -> Dict[str, int]:
    """Compare the source's frozen tensors with the local directories; raise naming every mismatch.

    LoRA trained on other base weights than the ones the plugin will load decodes nonsense without any
    error, so this check is on by default whenever directories are given.

    Args:
        dropped (Dict[str, torch.Tensor]): the release's backbone tensors in this plugin's names
            (``convert_state_dict``'s ``report["backbone"]``).
        paths (Dict[str, str]): group (whisper, wavlm, llm) -> local directory ("" skips the group).
        atol (float): absolute tolerance of ``torch.allclose``.
        rtol (float): relative tolerance.

    Returns:
        Dict[str, int]: tensors compared per group.
    """
    counts: Dict[str, int] = {}
    problems: List[str] = []
    for group, path in paths.items():
        if not path:
            continue
        local = _local_backbone_state(group, path)
        prefix = {"whisper": "whisper.", "wavlm": "wavlm.", "llm": "llm."}[group]
        n = 0
        for key, v in dropped.items():
            if not key.startswith(prefix):
                continue
            n += 1
            ref = local.get(key)
            if ref is None:
                problems.append(f"{key}: not in {path}")
            elif tuple(ref.shape) != tuple(v.shape):
                problems.append(f"{key}: checkpoint {tuple(v.shape)} vs {path} {tuple(ref.shape)}")
            elif not torch.allclose(ref.float(), v.float(), atol=atol, rtol=rtol):
                problems.append(f"{key}: differs from {path} (max abs diff "
                                f"{(ref.float() - v.float()).abs().max().item():.3g})")
        counts[group] = n
    if problems:
        raise CheckpointError(
            f"the checkpoint's frozen backbone tensors differ from the local directories ({len(problems)}): "
            + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""), reason="mismatch")
    return counts


def _recorded_lora(state: dict) -> Dict[str, Optional[float]]:
    """lora_r / lora_alpha from the source checkpoint's task config (cfg.task or argparse args)."""
    found: Dict[str, Optional[float]] = {"lora_r": None, "lora_alpha": None}
    sources = []
    cfg = state.get("cfg")
    if cfg is not None and cfg.get("task") is not None:
        sources.append(cfg["task"])
    if state.get("args") is not None:
        sources.append(vars(state["args"]))
    for task in sources:
        for k in found:
            v = task.get(k) if hasattr(task, "get") else None
            if v is not None and found[k] is None:
                found[k] = float(v)
    return found


def _check_recorded_rank(recorded_r: Optional[float], cfg, src_path: str) -> None:
    """Stage 1 scales LoRA by ``alpha / R``: a task config whose ``lora_r`` is not the tensors' rank means the
    recorded alpha belongs to another rank, an error. Stage 2 scales it by the prompt adapter's ``r`` alone (no
    ``alpha / R``, in both implementations), so there a differing ``lora_r`` changes nothing and is only logged."""
    if recorded_r is None or int(recorded_r) == cfg.lora_rank:
        return
    if cfg.prompt_adapter:
        logger.info(f"{src_path}: task config says lora_r={int(recorded_r)}, the LoRA tensors have rank "
                    f"{cfg.lora_rank}; stage 2 scales LoRA by the prompt adapter's r, not alpha / r: ignored")
        return
    raise CheckpointError(f"task config says lora_r={int(recorded_r)} but the LoRA tensors have rank "
                          f"{cfg.lora_rank} (stage 1 scales LoRA by lora_alpha / lora_r)", file=src_path,
                          reason="mismatch")


def _hf_config(group: str, path: str):
    """The backbone directory's Hugging Face config (errors name a missing directory or config.json)."""
    return load_config({"llm": LlamaConfig, "whisper": WhisperConfig, "wavlm": WavLMConfig}[group], path)


def target_config(arch: str, converted: Dict[str, torch.Tensor], paths: Dict[str, str], lora_alpha: float,
                  backbone_dtype: str = "float32"):
    """The WavLLMConfig the converted tensors belong to: sizes from ``arch``, overridden by the local
    directories' config.json and by the tensors themselves (LoRA rank, prompt adapter, WavLM layers).

    Args:
        arch (str): the named architecture for sizes not read from directories.
        converted (Dict[str, torch.Tensor]): the converted state dict.
        paths (Dict[str, str]): group (whisper, wavlm, llm) -> local directory, for the groups given.
        lora_alpha (float): the stage-1 LoRA alpha.
        backbone_dtype (str): one of ``DTYPE_NAMES``.

    Returns:
        WavLLMConfig: the model config of the converted checkpoint.
    """
    cfg = WavLLMConfig(whisper_path=paths.get("whisper", ""), wavlm_path=paths.get("wavlm", ""),
                       llama_path=paths.get("llm", ""), backbone_dtype=backbone_dtype, bottleneck_norm="post")
    fill_from_arch(cfg, arch)
    if paths.get("llm"):
        c = _hf_config("llm", paths["llm"])
        cfg.llama_dim, cfg.llama_layers = c.hidden_size, c.num_hidden_layers
        cfg.llama_heads = c.num_attention_heads
        cfg.llama_kv_heads = c.num_key_value_heads or c.num_attention_heads
        cfg.llama_ffn_dim, cfg.llama_vocab_size = c.intermediate_size, c.vocab_size
    if paths.get("whisper"):
        c = _hf_config("whisper", paths["whisper"])
        cfg.whisper_d_model, cfg.whisper_layers = c.d_model, c.encoder_layers
    if paths.get("wavlm"):
        c = _hf_config("wavlm", paths["wavlm"])
        cfg.wavlm_hidden, cfg.wavlm_layers = c.hidden_size, c.num_hidden_layers
    elif "acoustic_adapter.layer_weights" in converted:
        cfg.wavlm_layers = int(converted["acoustic_adapter.layer_weights"].numel()) - 1
    lora_a = [v for k, v in converted.items() if k.endswith("self_attn.q_proj.lora_A.weight")]
    if not lora_a:
        raise CheckpointError("no LoRA tensors (gpt_model.model_llama.layers.N.attention.wq_lora_A) in the file",
                              reason="mismatch")
    cfg.lora_rank, cfg.lora_alpha = int(lora_a[0].shape[0]), float(lora_alpha)
    cfg.prompt_adapter = "prompt_scale.down.weight" in converted
    if cfg.prompt_adapter:
        cfg.prompt_adapter_dim = int(converted["prompt_scale.down.weight"].shape[0])
        cfg.lora_scale_layout = "meta"  # r was learnt against Meta-ordered q/k outputs
    cfg.decode_bos_after_speech = True  # the reference's generator puts <s> where " </SPEECH>" starts
    cfg.llama_rms_norm_eps_override = 1e-6  # the reference's LLaMA (ModelArgs.norm_eps), whatever config.json says
    cfg.keep_reference_unused_projector = "semantic_only_projector.weight" in converted
    cfg.use_wavlm = "projector.weight" in converted
    if "llm.model.embed_tokens.weight" in converted:
        cfg.llama_vocab_size = int(converted["llm.model.embed_tokens.weight"].shape[0])
    return cfg


def _strict_check(cfg, arch: str, converted: Dict[str, torch.Tensor]) -> None:
    """Load the converted tensors strictly into the model ``cfg`` builds, on the meta device (no weights)."""
    shell = OmegaConf.structured(cfg)
    shell.whisper_path = shell.wavlm_path = shell.llama_path = ""  # sizes are in cfg; do not read weights
    vocab = int(cfg.llama_vocab_size) if cfg.llama_vocab_size and cfg.llama_vocab_size > 0 else 32000
    with torch.device("meta"):
        model = WavLLMModel(shell, vocab, arch)
    # the backbones given as directories are not part of the checkpoint (as in a trained checkpoint)
    model.backbone_from_path = {"whisper": bool(cfg.whisper_path), "wavlm": bool(cfg.wavlm_path),
                                "llm": bool(cfg.llama_path)}
    with warnings.catch_warnings():  # copying into meta tensors is a no-op by design: only keys/shapes matter
        warnings.simplefilter("ignore", UserWarning)
        model.load_state_dict(converted, strict=True)


def convert_checkpoint(src_path: str, dst_path: str, *, arch: str = "wavllm_7b", whisper_path: str = "",
                       wavlm_path: str = "", llama_path: str = "", tokenizer_dir: str = "",
                       lora_alpha: Optional[float] = None, check: bool = True, trust: bool = False,
                       backbone_dtype: str = "float32") -> Dict[str, object]:
    """Convert ``src_path`` and write a fairseq checkpoint to ``dst_path`` (atomically).

    Backbones with a local directory are dropped from the checkpoint (and compared with it when
    ``check``); backbones without one are converted into the checkpoint.

    Args:
        src_path (str): the reference release (a fairseq .pt of ``speechllm_model``).
        dst_path (str): where to write this plugin's checkpoint.
        arch (str): the named architecture for sizes not read from directories.
        whisper_path, wavlm_path, llama_path (str): local Hugging Face directories of the backbones, or "".
        tokenizer_dir (str): the tokenizer's directory recorded in the checkpoint (default: ``llama_path``).
        lora_alpha (Optional[float]): stage-1 LoRA alpha when the release does not record it.
        check (bool): compare the release's frozen tensors with the directories.
        trust (bool): allow full unpickling of ``src_path`` (default: weights only).
        backbone_dtype (str): one of ``DTYPE_NAMES``.

    Returns:
        Dict[str, object]: mapped and dropped counts, LoRA rank and alpha, stage, tensors checked per
        backbone, and the ``report`` lines (mapped, dropped).
    """
    state = torch_load(src_path, trust)
    src = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(src, dict) or not any(torch.is_tensor(v) for v in src.values()):
        raise CheckpointError("no model state dict in the file", file=src_path, reason="mismatch")
    src = {k: v for k, v in src.items() if torch.is_tensor(v)}
    paths = {"whisper": whisper_path, "wavlm": wavlm_path, "llm": llama_path}

    n_heads = n_kv = None
    if llama_path:
        c = _hf_config("llm", llama_path)
        n_heads, n_kv = c.num_attention_heads, c.num_key_value_heads or c.num_attention_heads
    else:
        tmp = WavLLMConfig()
        fill_from_arch(tmp, arch)
        n_heads, n_kv = tmp.llama_heads, tmp.llama_kv_heads or tmp.llama_heads
    converted, report = convert_state_dict(src, int(n_heads), int(n_kv),
                                           reload_groups=tuple(g for g, p in paths.items() if p))
    if report["unmatched"]:
        raise CheckpointError(
            f"{len(report['unmatched'])} source keys have no mapping: " + ", ".join(report["unmatched"][:40])
            + (" ..." if len(report["unmatched"]) > 40 else ""), file=src_path, reason="mismatch")

    recorded = _recorded_lora(state)
    alpha = lora_alpha if lora_alpha is not None else recorded["lora_alpha"]
    if alpha is None:
        raise CheckpointError("the checkpoint does not record lora_alpha (task config); pass --lora-alpha",
                              file=src_path, reason="mismatch")
    cfg = target_config(arch, converted, {g: p for g, p in paths.items() if p}, alpha, backbone_dtype)
    _check_recorded_rank(recorded["lora_r"], cfg, src_path)
    try:
        _strict_check(cfg, arch, converted)
    except CheckpointError as e:
        raise CheckpointError(f"converted tensors do not fit {arch} with the given directories: {e}",
                              file=src_path, reason="mismatch") from e
    checked = check_backbones(report["backbone"], paths) if check else {}

    out = _fairseq_checkpoint(cfg, arch, converted, tokenizer_dir or llama_path, src_path)
    os.makedirs(os.path.dirname(os.path.abspath(dst_path)), exist_ok=True)
    torch.save(out, dst_path + ".tmp")
    os.replace(dst_path + ".tmp", dst_path)
    return {"mapped": len(report["mapped"]), "dropped": len(report["dropped"]), "lora_rank": cfg.lora_rank,
            "lora_alpha": float(alpha), "stage": 2 if cfg.prompt_adapter else 1, "backbones_checked": checked,
            "report": {k: report[k] for k in ("mapped", "dropped")}}


def _fairseq_checkpoint(cfg, arch: str, model_state: Dict[str, torch.Tensor], tokenizer_dir: str,
                        src_path: str) -> dict:
    """A checkpoint dict that fairseq-generate, fairseq-hydra-train (restore_file) and WavLLM.from_pretrained read."""
    full = OmegaConf.to_container(OmegaConf.structured(FairseqConfig), resolve=True, enum_to_str=True,
                                  throw_on_missing=False)
    model_cfg = dict(asdict(cfg), _name=arch)
    task_cfg = {k: v for k, v in asdict(WavLLMInstructionConfig()).items()
                if not (isinstance(v, str) and v.startswith("${"))}
    task_cfg.update({"_name": "wavllm_instruction", "tokenizer_dir": tokenizer_dir})
    full["model"], full["task"] = model_cfg, task_cfg
    full["criterion"] = {"_name": "wavllm_cross_entropy"}
    return {"args": None, "cfg": full, "model": model_state, "criterion": None,
            "optimizer_history": [{"criterion_name": "WavLLMCrossEntropy", "optimizer_name": "none",
                                   "lr_scheduler_state": {}, "num_updates": 0}],
            "task_state": {}, "extra_state": {"converted_from": os.path.abspath(src_path)},
            "last_optimizer_state": None}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-convert-reference-checkpoint`` on ``argv`` (default: ``sys.argv[1:]``);
    returns the exit status (1 on a conversion error)."""
    p = argparse.ArgumentParser(prog="wavllm-convert-reference-checkpoint", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="the reference release (a fairseq .pt of speechllm_model)")
    p.add_argument("dst", help="where to write this plugin's checkpoint")
    p.add_argument("--arch", default="wavllm_7b", help="named architecture for sizes not read from directories")
    p.add_argument("--whisper-path", default="", help="local Whisper-large-v2 directory (Hugging Face format)")
    p.add_argument("--wavlm-path", default="", help="local WavLM-base directory")
    p.add_argument("--llama-path", default="", help="local Llama-2-7b-chat-hf directory (with tokenizer.model)")
    p.add_argument("--tokenizer-dir", default="", help="directory of tokenizer.model (default: --llama-path)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="stage-1 LoRA alpha if the checkpoint does not record it")
    p.add_argument("--backbone-dtype", default="float32", choices=DTYPE_NAMES)
    p.add_argument("--no-check-backbones", action="store_true",
                   help="do not compare the checkpoint's frozen tensors with the local directories")
    p.add_argument("--trust", action="store_true",
                   help="allow full unpickling of SRC (only for files you trust; default is weights-only loading)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every mapped and dropped key")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = convert_checkpoint(args.src, args.dst, arch=args.arch, whisper_path=args.whisper_path,
                                     wavlm_path=args.wavlm_path, llama_path=args.llama_path,
                                     tokenizer_dir=args.tokenizer_dir, lora_alpha=args.lora_alpha,
                                     check=not args.no_check_backbones, trust=args.trust,
                                     backbone_dtype=args.backbone_dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    report = summary.pop("report")
    if args.verbose:
        for line in report["mapped"]:
            print(f"mapped  {line}")
        for line in report["dropped"]:
            print(f"dropped {line}")
    print(f"stage {summary['stage']} checkpoint: {summary['mapped']} tensors mapped, {summary['dropped']} frozen "
          f"backbone tensors dropped (reloaded from the local directories), LoRA rank {summary['lora_rank']} "
          f"alpha {summary['lora_alpha']:g}")
    if summary["backbones_checked"]:
        print("backbone tensors equal to the local directories: "
              + ", ".join(f"{k} {v}" for k, v in summary["backbones_checked"].items()))
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
