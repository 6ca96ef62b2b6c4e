"""``wavllm-cache-encoders``: fill an encoder cache for manifests ahead of training or decoding.

    wavllm-cache-encoders [--config-dir DIR --config-name NAME] [--splits train_asr,valid_asr,...] \\
        task.data=DATA task.encoder_cache=CACHE model._name=ARCH model.whisper_path=... model.wavlm_path=... ...

It takes the same ``task.*`` / ``model.*`` settings as ``fairseq-hydra-train`` (the yaml of a stage and
the overrides of its command line), builds only the two frozen encoders, reads every clip of the
manifests exactly as the task's datasets do, and stores what the encoders output for each clip that
the cache (``task.encoder_cache``, in ``task.encoder_cache_dtype``) lacks. Training and decoding with the
same settings then find every clip (data/encoder_cache.py). Without ``--splits``: every ``*.tsv`` in
``task.data``.
"""
import argparse
import glob
import logging
import os
import sys
import time
from typing import List

import torch
from omegaconf import OmegaConf

from ..data.dataset import collate
from ..data.encoder_cache import attach_encoder_cache
from ..data.tokenizer import LlamaTokenizer
from ..errors import WavLLMInputError
from ..models.architectures import ARCHITECTURES, fill_from_arch
from ..models.config import WavLLMConfig, torch_dtype
from ..models.speech import FrozenEncoders
from ..tasks.instruction import WavLLMInstructionConfig, WavLLMInstructionTask

logger = logging.getLogger("wavllm_fairseq.cache_encoders")


def compose(config_dir: str, config_name: str, overrides: List[str]):
    """The ``task`` and ``model`` sections of a stage yaml with command-line overrides applied.

    Args:
        config_dir (str): the yaml's folder, or "" for overrides alone.
        config_name (str): the yaml's name without ``.yaml``.
        overrides (List[str]): ``group.key=value`` items, as fairseq-hydra-train takes them.

    Returns:
        Tuple[DictConfig, DictConfig]: the task config and the model config (sizes filled from the arch).
    """
    base = OmegaConf.create({"task": {}, "model": {}, "common": {"seed": 1}})
    if config_dir:
        path = os.path.join(config_dir, config_name + ".yaml")
        if not os.path.isfile(path):
            raise WavLLMInputError(f"no config {path}")
        loaded = OmegaConf.load(path)
        base = OmegaConf.merge(base, {k: loaded.get(k, {}) for k in ("task", "model", "common")})
    wanted = [o for o in overrides if o.split("=", 1)[0].split(".", 1)[0] in ("task", "model", "common")]
    cfg = OmegaConf.merge(base, OmegaConf.from_dotlist(wanted))
    task_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMInstructionConfig), _known(cfg.task, WavLLMInstructionConfig))
    # common.seed: fairseq seeds torch with it before building the model, which sets backbones without a folder
    task_cfg.seed, task_cfg.update_freq = int(cfg.common.seed), [1]
    arch = cfg.model.get("_name", "wavllm")
    if arch not in ARCHITECTURES:
        raise WavLLMInputError(f"model._name={arch!r} is not an architecture ({', '.join(ARCHITECTURES)})")
    model_cfg = OmegaConf.merge(OmegaConf.structured(WavLLMConfig), _known(cfg.model, WavLLMConfig))
    fill_from_arch(model_cfg, arch)
    return task_cfg, model_cfg


def _known(node, dataclass_type) -> dict:
    """The keys of ``node`` that ``dataclass_type`` has; ``key=`` (None here) is "" for string fields, as
    Hydra reads it; interpolations into other sections are left to their defaults."""
    data = OmegaConf.to_container(node, resolve=False)
    fields = dataclass_type.__dataclass_fields__
    out = {}
    for k, v in data.items():
        if k not in fields or (isinstance(v, str) and "${" in v):
            continue
        out[k] = "" if v is None and fields[k].type is str else v
    return out


def splits_of(task_cfg, splits: str) -> List[str]:
    """The manifests to cache: the ``--splits`` list, or every ``*.tsv`` of ``task.data``."""
    if splits:
        return [s for s in splits.split(",") if s]
    names = sorted(os.path.basename(p)[: -len(".tsv")] for p in glob.glob(os.path.join(task_cfg.data, "*.tsv")))
    if not names:
        raise WavLLMInputError(f"no *.tsv manifests in task.data={task_cfg.data}")
    return names


def fill_split(task, encoders: FrozenEncoders, split: str, batch_size: int) -> int:
    """Encode every clip of one manifest that the cache lacks; returns the number of clips with audio."""
    dataset = task.load_corpus(split, shuffle=False)
    order = [i for i in dataset.ordered_indices() if dataset.rows[i].with_speech]
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start: start + batch_size]]
        batch = collate([it for it in items if it is not None], task.tokenizer.pad_id)
        if batch:
            encoders.fill(batch["net_input"]["audio"], batch["net_input"]["audio_lengths"])
    return len(order)


def main(argv=None) -> int:
    """Console entry point (see the module docstring)."""
    p = argparse.ArgumentParser(prog="wavllm-cache-encoders", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default="", help="folder of the stage yaml whose task/model sections to use")
    p.add_argument("--config-name", default="", help="the yaml's name (without .yaml)")
    p.add_argument("--splits", default="", help="comma-separated manifest names under task.data (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="clips encoded together")
    p.add_argument("overrides", nargs="*", help="task.KEY=VALUE / model.KEY=VALUE, as fairseq-hydra-train takes them")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    try:
        task_cfg, model_cfg = compose(args.config_dir, args.config_name, args.overrides)
        if not task_cfg.encoder_cache:
            raise WavLLMInputError("set task.encoder_cache=DIR (the folder training and decoding will read)")
        if not task_cfg.data:
            raise WavLLMInputError("set task.data=DIR (the manifests' folder)")
        task = WavLLMInstructionTask.setup_task(task_cfg)
        if task.tokenizer is None:  # the tokenizer of the LLM folder, as the task's build_model takes it
            if not model_cfg.llama_path:
                raise WavLLMInputError("set task.tokenizer_dir or model.llama_path (the manifests' prompts are "
                                       "tokenized to check their lengths, as training does)")
            task.tokenizer = LlamaTokenizer.from_dir(model_cfg.llama_path)
        torch.manual_seed(task_cfg.seed)  # as fairseq-hydra-train does before building the model
        encoders = FrozenEncoders(model_cfg, torch_dtype(model_cfg.backbone_dtype))
        cache = attach_encoder_cache(encoders, task_cfg.encoder_cache, str(task_cfg.encoder_cache_dtype))
        t0 = time.time()
        for split in splits_of(task_cfg, args.splits):
            n = fill_split(task, encoders, split, args.batch_size)
            logger.info(f"{split}: {n} clips; {cache.summary()} ({time.time() - t0:.0f} s)")
        cache.close()
    except WavLLMInputError as e:
        print(f"wavllm-cache-encoders: {e}", file=sys.stderr)
        return 2
    print(f"cached {cache.stats['written']} new clips, {len(cache)} in {cache.folder} ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
