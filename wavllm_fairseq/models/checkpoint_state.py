"""What a WavLLM checkpoint holds, and how strictly it loads (a mixin of ``WavLLMModel``).

Checkpoints hold what cannot be reloaded from the backbone folders: adapters, projector(s), LoRA
and the prompt adapter, plus any backbone built without a folder. Loading is strict except for
exactly two known gaps, both reported.
"""
import logging
from typing import Dict, List

from fairseq.models import BaseFairseqModel

from ..errors import CheckpointError

logger = logging.getLogger(__name__)


class CheckpointState:
    """``state_dict`` / ``load_state_dict`` of ``WavLLMModel`` (a mixin placed before ``BaseFairseqModel``).

    The model sets ``backbone_from_path``: {"whisper", "wavlm", "llm"} -> whether that backbone was
    loaded from a local folder (its frozen tensors then stay out of checkpoints).
    """

    backbone_from_path: Dict[str, bool]

    def _backbone_prefixes_from_paths(self) -> List[str]:
        return [p for p, flag in (("whisper.", self.backbone_from_path["whisper"]),
                                  ("wavlm.", self.backbone_from_path["wavlm"]),
                                  ("llm.", self.backbone_from_path["llm"])) if flag]

    def _is_reloadable_backbone_key(self, key: str) -> bool:
        """A frozen backbone tensor that is reloaded from its local directory (not stored in checkpoints)."""
        if not any(key.startswith(p) for p in self._backbone_prefixes_from_paths()):
            return False
        return not (key.startswith("llm.") and (".lora_A." in key or ".lora_B." in key))

    def state_dict(self, *args, **kwargs):
        """Everything except frozen backbones loaded from local directories (those reload from there).

        Args:
            *args, **kwargs: ``nn.Module.state_dict``'s.

        Returns:
            Dict[str, torch.Tensor]: the checkpoint's tensors.
        """
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for k in list(state.keys()):
            if self._is_reloadable_backbone_key(k[len(prefix):]):
                del state[k]
        return state

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        """Strict load that tolerates exactly two known gaps, and reports them:
        backbone tensors reloaded from their directories, and a fresh stage-2 prompt adapter when the
        checkpoint comes from stage 1. Any other missing/unexpected key or shape mismatch is an error.

        Args:
            state_dict (Dict[str, torch.Tensor]): the checkpoint's tensors.
            strict (bool): raise on any other gap (fairseq's default).
            model_cfg, args: fairseq's arguments, not read.

        Returns:
            NamedTuple: ``nn.Module.load_state_dict``'s missing and unexpected keys (of the tolerated gaps).

        Raises:
            CheckpointError: for any other missing or unexpected key or shape mismatch, with ``strict``.
        """
        own = super().state_dict()
        missing = [k for k in own if k not in state_dict and not self._is_reloadable_backbone_key(k)]
        unexpected = [k for k in state_dict if k not in own]
        fresh_prompt = [k for k in missing if k.startswith("prompt_scale.")]
        missing = [k for k in missing if not k.startswith("prompt_scale.")]
        bad_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                     for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if strict and (missing or unexpected or bad_shape):
            raise CheckpointError(
                "checkpoint does not match the model: "
                + (f"missing {missing[:20]} ({len(missing)}) " if missing else "")
                + (f"unexpected {unexpected[:20]} ({len(unexpected)}) " if unexpected else "")
                + (f"shape mismatches {bad_shape[:20]}" if bad_shape else ""), reason="mismatch")
        if fresh_prompt:
            logger.warning(f"prompt adapter not in the checkpoint: initialised fresh ({len(fresh_prompt)} tensors: "
                           f"{fresh_prompt}); everything else was loaded")
        result = super(BaseFairseqModel, self).load_state_dict(
            {k: v for k, v in state_dict.items() if k in own}, strict=False)
        return result
