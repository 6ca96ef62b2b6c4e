"""``@register_criterion("wavllm_ctc_align")``: CTC from the speech embeddings to the LLM's own token embeddings.

An optional warm-up before stage 1 that trains only the modality adapters and the projector, without a
forward through the LLM. Each speech embedding (80 ms frame, the projector's output, the vectors the LLM
reads) scores every token of the vocabulary by its dot product with that token's input embedding (the
frozen LLM embedding table), plus one learned blank vector; CTC aligns these scores to the transcript's
tokens. A projector trained so places the speech span near the embeddings of the words spoken, the input
the frozen LLM already understands, so that stage 1 starts from speech the LLM can read instead of from
random vectors. (CTC alignment of a speech encoder to an LLM's vocabulary before the LLM fine-tuning is
the first stage of e.g. Soundwave, arXiv 2502.12900, and of LegoSLM, arXiv 2505.11352.)

Rows of other tasks than ``criterion.tasks`` (default ASR: the answer is the transcript) are skipped; the
target is the answer without the tokens that decode to nothing (end-of-turn, eos: special tokens) or to
whitespace only. CTC alone sharpens its scores by growing the frames' norm past that of any token (measured:
37 against 3.2 after 600 updates); ``criterion.norm_weight > 0`` scores each frame rescaled to the embeddings'
mean norm (times a learned scale) and penalises the norm instead. The loss is summed over rows and divided by
the target tokens. The learned blank (a vector and a bias) belongs to this criterion, so fairseq optimises it
with the model and stores it in the checkpoint's ``criterion`` entry; stage 1 reads only the model. A model
with ``model.speech_shrink=ctc`` holds its own blank (models/shrink.py: it keeps the frames this CTC assigns to
tokens): the criterion then scores with the model's, which stage 1 reads, and needs ``norm_weight`` 0 (the
shrink scores the frames as they are).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import FairseqDataclass


@dataclass
class WavLLMCTCAlignConfig(FairseqDataclass):
    """The ``criterion.*`` options of ``wavllm_ctc_align``."""

    tasks: str = field(default="asr", metadata={"help": "comma-separated tasks whose answer is the transcript of "
                                                        "the clip (the CTC targets); other rows are skipped"})
    norm_weight: float = field(default=0.0, metadata={
        "help": "0 (the default, the setting measured in examples/wavllm/toy/RESULTS.md): the scores are the "
                "frames' dot products as they are. > 0: each frame is rescaled to norm e (the mean norm of the "
                "LLM's token embeddings) times a learned scale before scoring, and a penalty (|x| / e - 1)^2 per "
                "frame with this weight keeps the frames' own norms near e, the scale the LLM reads"})


@register_criterion("wavllm_ctc_align", dataclass=WavLLMCTCAlignConfig)
class WavLLMCTCAlign(FairseqCriterion):
    """CTC over the LLM vocabulary, scored against the frozen input embeddings (module docstring).

    Args:
        task (WavLLMInstructionTask): the task (its tokenizer tells which target tokens carry text).
        tasks (str): comma-separated task names whose rows are aligned.
    """

    def __init__(self, task, tasks="asr", norm_weight=0.0):
        super().__init__(task)
        self.tasks = {t.strip() for t in str(tasks).split(",") if t.strip()}
        if not self.tasks:
            raise ValueError("criterion.tasks names no task")
        dim = getattr(task, "llm_dim", None)
        if dim is None:
            raise ValueError("wavllm_ctc_align needs the model first (task.build_model sets task.llm_dim)")
        self.blank = nn.Parameter(torch.zeros(int(dim)))
        self.blank_bias = nn.Parameter(torch.zeros(()))
        self.log_scale = nn.Parameter(torch.zeros(()))  # the scores' sharpness, learned
        self.norm_weight = float(norm_weight)
        self._has_text: Dict[int, bool] = {}
        # CTC's scores grow peaky as it learns: the softmax gradient then holds denormal floats, which run many
        # times slower on x86 CPUs; flush them to zero in this (training) process (no effect where unsupported)
        torch.set_flush_denormal(True)

    @classmethod
    def from_checkpoint(cls, task, state: dict) -> "WavLLMCTCAlign":
        """The criterion a stage-1a checkpoint was trained with: its options and its learned blank and scale.

        Args:
            task: the task, with ``llm_dim`` set (as ``task.build_model`` sets it).
            state (dict): the checkpoint (``checkpoint_io.load_checkpoint_file``): its ``cfg.criterion`` and
                ``criterion`` entries.

        Returns:
            WavLLMCTCAlign: the criterion, ready for ``greedy_decode``.
        """
        cfg = state["cfg"]["criterion"]
        crit = cls(task, tasks=cfg["tasks"], norm_weight=cfg["norm_weight"])
        crit.load_state_dict(state["criterion"])
        return crit

    def _text_token(self, i: int) -> bool:
        """Whether token ``i`` decodes to visible text (specials and whitespace-only pieces do not)."""
        if i not in self._has_text:
            self._has_text[i] = bool(self.task.tokenizer.decode([i]).strip())
        return self._has_text[i]

    def ctc_targets(self, sample) -> List[List[int]]:
        """The text tokens of each row's answer ([] for a row of another task).

        Args:
            sample (dict): the collater's batch (``target``, ``target_lengths``, ``task_names``).

        Returns:
            List[List[int]]: one token list per row.
        """
        out = []
        for b, name in enumerate(sample["task_names"]):
            if name not in self.tasks:
                out.append([])
                continue
            ids = sample["target"][b, : int(sample["target_lengths"][b])].tolist()
            out.append([i for i in ids if self._text_token(i)])
        return out

    def frame_log_probs(self, model, net_input) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per speech frame, log-probabilities over blank (index 0) and the vocabulary (index v + 1).

        Args:
            model (WavLLMModel): the model (``encode_speech``, ``llm``).
            net_input (dict): the batch's ``net_input``.

        Returns:
            Tuple[torch.Tensor, torch.Tensor, torch.Tensor]: log-probabilities with shape (N, B, V + 1)
            (CTC's time-major layout), the frames of each row (B,), and the norm penalty summed over the
            valid frames (a scalar).
        """
        speech, lengths = model.encode_speech(net_input["audio"], net_input["audio_lengths"], shrink=False)  # (B, N, D)
        table = model.llm.get_input_embeddings().weight.float()  # (V, D), frozen
        shrink = getattr(model, "speech_shrink", None)
        if shrink is not None and self.norm_weight > 0:
            raise ValueError("model.speech_shrink=ctc scores the frames as they are: use criterion.norm_weight=0")
        e = table.norm(dim=1).mean()
        speech = speech.float()
        norm = speech.norm(dim=-1, keepdim=True)  # (B, N, 1)
        if self.norm_weight > 0:
            unit = speech * (e / norm.clamp(min=1e-6)) * self.log_scale.exp()  # rescaled to the embeddings' norm
        else:
            unit = speech
        if shrink is not None:  # the model's blank, which decides what its LLM reads
            logits = shrink.logits(unit, table)
        else:
            scores = unit @ table.t()  # (B, N, V)
            blank = (unit @ self.blank.float() + self.blank_bias)[..., None]  # (B, N, 1)
            logits = torch.cat([blank, scores], dim=-1)
        valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < lengths[:, None]  # (B, N)
        penalty = ((norm.squeeze(-1) / e - 1.0) ** 2 * valid).sum()
        return F.log_softmax(logits, dim=-1).transpose(0, 1), lengths, penalty

    @torch.no_grad()
    def greedy_decode(self, model, net_input) -> List[List[int]]:
        """Greedy CTC decoding of the frames' scores: the best index per frame, repeats merged, blanks dropped.

        What the adapters alone hear after this stage, without the LLM (``listening_probes.py ctc``).

        Args:
            model (WavLLMModel): the model.
            net_input (dict): ``audio`` and ``audio_lengths`` of a batch.

        Returns:
            List[List[int]]: the LLM token ids heard in each row.
        """
        lprobs, frames, _ = self.frame_log_probs(model, net_input)  # (N, B, V + 1)
        best = lprobs.argmax(-1).t()  # (B, N)
        out = []
        for b in range(best.shape[0]):
            ids, prev = [], 0
            for i in best[b, : int(frames[b])].tolist():
                if i != prev and i != 0:
                    ids.append(i - 1)
                prev = i
            out.append(ids)
        return out

    def forward(self, model, sample, reduce=True):
        """The summed CTC loss of a batch's aligned rows.

        Args:
            model (WavLLMModel): the model.
            sample (dict): the collater's batch (data/dataset.py).
            reduce (bool): fairseq's argument; the loss is always summed.

        Returns:
            Tuple[torch.Tensor, int, dict]: the loss, the sample size (target tokens) and the logging output.
        """
        targets = self.ctc_targets(sample)
        rows = [b for b, t in enumerate(targets) if t]
        ntokens = sum(len(targets[b]) for b in rows)
        if not rows:  # nothing to align in this batch: a zero loss that still touches the graph
            zero = sum(p.sum() for p in model.projector.parameters()) * 0.0
            return zero, 0, {"loss": 0.0, "ntokens": 0, "nsentences": 0, "sample_size": 0}
        net_input = dict(sample["net_input"])
        index = torch.tensor(rows, device=net_input["audio"].device)
        for key in ("audio", "audio_lengths"):
            net_input[key] = net_input[key].index_select(0, index)
        net_input["audio"] = net_input["audio"][:, : int(net_input["audio_lengths"].max())]
        lprobs, frames, penalty = self.frame_log_probs(model, net_input)
        flat = torch.tensor([i + 1 for b in rows for i in targets[b]], dtype=torch.long, device=lprobs.device)
        target_lengths = torch.tensor([len(targets[b]) for b in rows], dtype=torch.long, device=lprobs.device)
        with torch.backends.cudnn.flags(enabled=False):
            ctc = F.ctc_loss(lprobs, flat, frames, target_lengths, blank=0, reduction="sum", zero_infinity=True)
        loss = ctc + self.norm_weight * penalty
        logging_output = {"loss": loss.detach().item(), "ctc_loss": ctc.detach().item(),
                          "norm_penalty": penalty.detach().item(), "frames": int(frames.sum()),
                          "ntokens": ntokens, "nsentences": len(rows), "sample_size": ntokens}
        return loss, ntokens, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict]) -> None:
        """Log the loss and the CTC loss in bits per target token, and the norm penalty per frame.

        Args:
            logging_outputs (List[Dict]): the logging outputs of :meth:`forward`, from every worker.
        """

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        n = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(n, 1) / math.log(2), n, round=3)
        metrics.log_scalar("ctc_loss", total("ctc_loss") / max(n, 1) / math.log(2), n, round=3)
        metrics.log_scalar("norm_penalty", total("norm_penalty") / max(total("frames"), 1), total("frames"), round=4)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """True: every key is a sum.

        Returns:
            bool: True.
        """
        return True
