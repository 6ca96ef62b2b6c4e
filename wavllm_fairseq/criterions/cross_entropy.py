"""``@register_criterion("wavllm_cross_entropy")``: cross entropy on the answer tokens only.

The model returns logits only at the positions that predict an answer token (``target</s>`` of every
turn), so system prompt, instruction, speech and padding never enter the loss. The summed loss is divided
(fairseq's ``sample_size``) by the answer tokens, or with ``criterion.normalize_by=reference`` by what the
reference implementation divides by: every position it predicts after the speech span, the instruction's
as well as the answer's (its ``ntokens``: the tokens after the speech span less the first). Logs loss (base 2,
per ``sample_size`` unit), nll_loss (base 2, per answer token), token accuracy and the loss of each task.

``criterion.ctc_weight > 0`` (ours, not the paper's; off by default) adds stage 1a's CTC (ctc_align.py) on the
rows of ``criterion.ctc_tasks`` as an auxiliary loss: the speech embeddings keep scoring the transcript's
tokens while the LLM's loss trains the adapters, so that ``model.speech_shrink`` keeps choosing about one
frame per token (without it the choice drifts: RESULTS.md, "Shrinking the speech span"). Each loss is a mean
over its own tokens, so the total per answer token is ``ce + ctc_weight * ctc`` (logged: ``ctc_loss``, bits per
CTC target token).
"""
import math
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn.functional as F
from fairseq import metrics
from fairseq.criterions import FairseqCriterion, register_criterion
from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from .ctc_align import WavLLMCTCAlign

TASK_LOSS = "task_loss:"
TASK_NTOK = "task_ntok:"
NORMALIZATIONS = ("answer", "reference")


@dataclass
class WavLLMCrossEntropyConfig(FairseqDataclass):
    """The ``criterion.*`` options of ``wavllm_cross_entropy``."""

    label_smoothing: float = field(default=0.0,
                                   metadata={"help": "epsilon for label smoothing (0 = plain cross entropy)"})
    report_per_task: bool = field(default=True, metadata={"help": "log the loss of each task separately"})
    normalize_by: ChoiceEnum(list(NORMALIZATIONS)) = field(
        default="answer",
        metadata={"help": "what the summed loss is divided by: answer = the answer tokens (a per-answer-token mean: "
                          "an answer's gradient does not shrink with its instruction's length, and the toy's learning "
                          "rates were tuned with it); reference = the reference implementation's, every position "
                          "predicted after the speech span (instruction and answer tokens), which weights rows with "
                          "short instructions more and makes the loss smaller than the per-token nll_loss"})
    ctc_weight: float = field(default=0.0, metadata={
        "help": "> 0: add stage 1a's CTC from the speech embeddings to the LLM's token embeddings "
                "(criterion wavllm_ctc_align, norm_weight 0) with this weight, on the rows of ctc_tasks; with "
                "model.speech_shrink (ctc or ctc_tokens) it scores with the model's blank, else with its own "
                "(a stage-1a checkpoint's, or zero)"})
    ctc_tasks: str = field(default="asr", metadata={"help": "comma-separated tasks whose answer is the clip's "
                                                            "transcript, the CTC targets of ctc_weight"})


@register_criterion("wavllm_cross_entropy", dataclass=WavLLMCrossEntropyConfig)
class WavLLMCrossEntropy(FairseqCriterion):
    """Cross entropy (optionally label-smoothed) over the target tokens the model returns logits for.

    Args:
        task (FairseqTask): the task.
        label_smoothing (float): eps; per token (1 - eps) * nll + eps * (-mean log-probability over the vocabulary).
        report_per_task (bool): log each task's loss (``loss_<task>``) from the batch's ``task_names``.
        normalize_by (str): the ``sample_size``, one of ``NORMALIZATIONS`` (see the config's help).
        ctc_weight (float): the weight of the auxiliary CTC (module docstring); 0 = none.
        ctc_tasks (str): comma-separated tasks whose rows the CTC aligns.
    """

    def __init__(self, task, label_smoothing=0.0, report_per_task=True, normalize_by="answer", ctc_weight=0.0,
                 ctc_tasks="asr"):
        super().__init__(task)
        if ctc_weight < 0:
            raise ValueError(f"criterion.ctc_weight must be >= 0, got {ctc_weight}")
        self.ctc_weight = float(ctc_weight)
        # a submodule, so that its blank (when the model has none) is optimised and saved with the criterion
        self.ctc = WavLLMCTCAlign(task, tasks=ctc_tasks, norm_weight=0.0) if self.ctc_weight > 0 else None
        self.eps = label_smoothing
        self.report_per_task = report_per_task
        if str(normalize_by) not in NORMALIZATIONS:
            raise ValueError(f"criterion.normalize_by must be one of {NORMALIZATIONS}, got {normalize_by!r}")
        self.normalize_by = str(normalize_by)

    def forward(self, model, sample, reduce=True):
        """The summed loss of a batch.

        Args:
            model (WavLLMModel): returns (logits (N, V), targets (N,), rows (N,)) for the N target tokens.
            sample (dict): the collater's batch (data/dataset.py).
            reduce (bool): fairseq's argument; the loss is always summed.

        Returns:
            Tuple[torch.Tensor, int, dict]: the loss (a scalar, summed over target tokens), the sample size
            (:meth:`sample_size`) and the logging output.
        """
        logits, target, rows = model(**sample["net_input"])  # (N, V), (N,), (N,)
        lprobs = F.log_softmax(logits.float(), dim=-1)
        nll = -lprobs.gather(1, target[:, None]).squeeze(1)  # (N,)
        if self.eps > 0:
            smooth = -lprobs.mean(dim=-1)
            per_token = (1 - self.eps) * nll + self.eps * smooth
        else:
            per_token = nll
        loss = per_token.sum()
        ntokens = int(target.numel())
        sample_size = self.sample_size(sample, ntokens)
        ctc_log = {}
        if self.ctc is not None:
            ctc, ctc_ntokens, out = self.ctc(model, sample)
            if ctc_ntokens > 0:  # a mean over the CTC tokens, weighted, in units of this loss's sample size
                loss = loss + self.ctc_weight * ctc * (sample_size / ctc_ntokens)
            ctc_log = {"ctc_loss": out["ctc_loss"] if ctc_ntokens else 0.0, "ctc_ntokens": ctc_ntokens}
        logging_output = {
            **ctc_log,
            "loss": loss.detach().item(),
            "nll_loss": nll.detach().sum().item(),
            "ntokens": ntokens,
            "nsentences": sample["nsentences"],
            "sample_size": sample_size,
            "n_correct": int((lprobs.argmax(-1) == target).sum()),
        }
        if self.report_per_task and "task_names" in sample:
            names = sample["task_names"]
            per_row = torch.zeros(len(names), dtype=torch.float64).index_add_(0, rows.cpu(),
                                                                              nll.detach().double().cpu())
            count = torch.bincount(rows.cpu(), minlength=len(names))
            for i, name in enumerate(names):
                logging_output[TASK_LOSS + name] = logging_output.get(TASK_LOSS + name, 0.0) + float(per_row[i])
                logging_output[TASK_NTOK + name] = logging_output.get(TASK_NTOK + name, 0) + int(count[i])
        return loss, sample_size, logging_output

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The criterion's state from a checkpoint; with ``ctc_weight`` also a stage-1a checkpoint's
        (``wavllm_ctc_align``: its blank and scale continue here) or one without any (the blank stays at zero).

        Args:
            state_dict (dict): the checkpoint's ``criterion`` entry.
            strict (bool): as in ``nn.Module.load_state_dict``.
            assign (bool): as in ``nn.Module.load_state_dict``.

        Returns:
            NamedTuple: ``nn.Module.load_state_dict``'s missing and unexpected keys.
        """
        state = dict(state_dict or {})
        if self.ctc is not None:
            if state and not any(k.startswith("ctc.") for k in state):  # wavllm_ctc_align's own keys
                state = {f"ctc.{k}": v for k, v in state.items()}
            elif not state:  # trained without the auxiliary CTC
                state = self.state_dict()
        return super().load_state_dict(state, strict=strict, assign=assign)

    def sample_size(self, sample, ntokens: int) -> int:
        """What the summed loss is divided by: the answer tokens, or (``normalize_by="reference"``) every
        token after the speech span but the first (``post_lengths - 1`` per row: the reference's ``ntokens``,
        the right prompt and the answer as its collater counts them).

        Args:
            sample (dict): the collater's batch (``net_input["post_lengths"]``: (B,)).
            ntokens (int): the answer tokens of the batch.

        Returns:
            int: the sample size.
        """
        if self.normalize_by == "answer":
            return ntokens
        return int((sample["net_input"]["post_lengths"] - 1).clamp(min=0).sum())

    @classmethod
    def reduce_metrics(cls, logging_outputs: List[Dict]) -> None:
        """Log loss and nll_loss (base 2, per target token), ppl, accuracy and each task's loss.

        Args:
            logging_outputs (List[Dict]): the logging outputs of :meth:`forward`, from every worker.
        """

        def total(key):
            return sum(log.get(key, 0) for log in logging_outputs)

        ntokens = total("ntokens")
        sample_size = total("sample_size")
        metrics.log_scalar("loss", total("loss") / max(sample_size, 1) / math.log(2), sample_size, round=3)
        metrics.log_scalar("nll_loss", total("nll_loss") / max(ntokens, 1) / math.log(2), ntokens, round=3)
        metrics.log_derived("ppl", lambda meters: 2 ** meters["nll_loss"].avg)
        metrics.log_scalar("accuracy", 100.0 * total("n_correct") / max(ntokens, 1), ntokens, round=2)
        if any("ctc_ntokens" in log for log in logging_outputs):
            n = total("ctc_ntokens")
            metrics.log_scalar("ctc_loss", total("ctc_loss") / max(n, 1) / math.log(2), n, round=3)
        tasks = sorted({k[len(TASK_LOSS):] for log in logging_outputs for k in log if k.startswith(TASK_LOSS)})
        for t in tasks:
            n = total(TASK_NTOK + t)
            if n > 0:
                metrics.log_scalar(f"loss_{t}", total(TASK_LOSS + t) / n / math.log(2), n, round=3)

    @staticmethod
    def logging_outputs_can_be_summed() -> bool:
        """False: the logging outputs are gathered, not summed.

        Returns:
            bool: False.
        """
        # per-task keys differ between workers, so they are gathered rather than summed as tensors
        return False
