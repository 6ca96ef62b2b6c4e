"""The training loop the three stage-0 stand-ins share: AdamW, warm-up then linear decay, clipping, logging."""
import random
import time
from typing import Callable, List, Sequence

import torch
import torch.nn as nn

BETAS, WEIGHT_DECAY, CLIP_NORM = (0.9, 0.98), 0.01, 1.0
LOG_EVERY = 100  # steps between progress lines (and one at the last step)


def log(msg: str) -> None:
    """Print ``msg`` as a ``[stage0]`` progress line.

    Args:
        msg (str): the message.
    """
    print(f"[stage0] {msg}", flush=True)


def schedule(opt: torch.optim.Optimizer, step: int, total: int, peak: float, warmup: int) -> None:
    """Set the learning rate of ``step``: linear warm-up to ``peak`` over ``warmup`` steps, linear decay to 5%.

    Args:
        opt (torch.optim.Optimizer): its param groups get the rate.
        step (int): the step, from 0.
        total (int): the number of steps.
        peak (float): the rate after warm-up.
        warmup (int): warm-up steps.
    """
    lr = peak * min(1.0, (step + 1) / warmup) * max(0.05, 1 - step / total)
    for g in opt.param_groups:
        g["lr"] = lr


class Batches:
    """Index batches of ``size`` out of ``n`` items: passes over fresh shuffles of all of them, the
    leftovers of one pass starting the next batch."""

    def __init__(self, rng: random.Random, n: int, size: int):
        self.rng, self.n, self.size = rng, n, size
        self.order: List[int] = []

    def __call__(self) -> List[int]:
        if len(self.order) < self.size:
            self.order += self.rng.sample(range(self.n), self.n)
        idx, self.order = self.order[: self.size], self.order[self.size:]
        return idx


def train_steps(name: str, model: nn.Module, params: Sequence[nn.Parameter], cfg: dict,
                batch_loss: Callable[[], torch.Tensor], loss_name: str = "loss") -> None:
    """``cfg["steps"]`` AdamW steps on ``batch_loss()`` (which draws its own batch) at peak ``cfg["lr"]``,
    warm-up over a tenth of the steps; ``model`` trains during them and is in eval mode after.

    Args:
        name (str): the stand-in's name, for the progress lines.
        model (nn.Module): the model being trained.
        params (Sequence[nn.Parameter]): what AdamW updates (the model's and its heads').
        cfg (dict): ``steps`` and ``lr`` (stage 0's ``SETTINGS``).
        batch_loss (Callable[[], torch.Tensor]): draws a batch and returns its scalar loss.
        loss_name (str): the loss's name in the progress lines.
    """
    params = list(params)
    opt = torch.optim.AdamW(params, lr=cfg["lr"], betas=BETAS, weight_decay=WEIGHT_DECAY)
    t0 = time.time()
    model.train()
    for step in range(cfg["steps"]):
        loss = batch_loss()
        schedule(opt, step, cfg["steps"], cfg["lr"], max(1, cfg["steps"] // 10))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, CLIP_NORM)
        opt.step()
        if (step + 1) % LOG_EVERY == 0 or step + 1 == cfg["steps"]:
            log(f"{name} stand-in: step {step + 1}/{cfg['steps']} {loss_name} {loss.item():.3f} "
                f"({time.time() - t0:.0f} s)")
    model.eval()
