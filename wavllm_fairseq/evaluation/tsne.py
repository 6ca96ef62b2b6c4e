"""t-SNE of the prompt-aware adapter's LoRA scales r, coloured by task (paper figure 2).

    wavllm-plot-prompt-tsne --checkpoint stage2/checkpoint_last.pt --manifests test_asr.tsv test_st.tsv ... \
        --out prompt_tsne.png [--perplexity 30]

Each manifest row's instruction goes through the frozen LLM (no LoRA) and the prompt adapter, giving
one D-dimensional r per prompt; t-SNE maps them to 2-D. Prompts of the same task should cluster.
"""
import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..data.dataset import pad_2d
from ..data.manifest import read_manifest
from ..data.prompt_template import adapter_text
from ..hub import WavLLM


def prompt_scales(api, prompts: List[str], batch_size: int = 32) -> np.ndarray:
    """The prompt adapter's outputs r for instructions, from the adapter input the collater builds (the
    reference's '"' + instruction + '"').

    Args:
        api (WavLLM): a loaded stage-2 model.
        prompts (List[str]): N instructions.
        batch_size (int): instructions per forward pass.

    Returns:
        np.ndarray: r of shape (N, D).
    """
    model, tok = api.model, api.tokenizer
    if model.prompt_scale is None:
        raise SystemExit("this checkpoint has no prompt adapter (stage 1): use a stage-2 checkpoint")
    out = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            ids = [tok.encode(adapter_text(p)) for p in chunk]
            r = model.prompt_lora_scale(pad_2d(ids, tok.pad_id), torch.tensor([len(x) for x in ids]))
            out.append(r.float().cpu().numpy())
    return np.concatenate(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``wavllm-plot-prompt-tsne`` on ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    p = argparse.ArgumentParser(prog="wavllm-plot-prompt-tsne", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--manifests", nargs="+", required=True)
    p.add_argument("--out", default="prompt_tsne.png")
    p.add_argument("--perplexity", type=float, default=30.0)
    p.add_argument("--max-per-task", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--llama-path", default=None, help="override the checkpoint's LLaMA dir")
    args = p.parse_args(argv)

    api = WavLLM.from_pretrained(args.checkpoint, llama_path=args.llama_path, merge_lora=False)
    by_task: Dict[str, List[str]] = {}
    for path in args.manifests:
        rows, _ = read_manifest(path, require_target=False)
        for row in rows:
            if row.prompt and len(by_task.setdefault(row.task, [])) < args.max_per_task:
                by_task[row.task].append(row.prompt)
    prompts = [q for qs in by_task.values() for q in qs]
    labels = [t for t, qs in by_task.items() for _ in qs]
    if len(prompts) < 5:
        raise SystemExit(f"need at least 5 prompts, found {len(prompts)}")
    r = prompt_scales(api, prompts)
    spread = float(np.std(r, axis=0).max())
    if not np.isfinite(r).all() or spread < 1e-6:
        # sklearn's t-SNE divides by the variance (and has crashed on such input): say what happened
        raise SystemExit(f"the prompt adapter gives the same r for all {len(prompts)} prompts (largest per-feature "
                         f"std {spread:.2e}): nothing to plot")
    from sklearn.manifold import TSNE

    xy = TSNE(n_components=2, perplexity=min(args.perplexity, (len(prompts) - 1) / 3), random_state=args.seed,
              init="pca").fit_transform(r)
    import logging

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # before the import: it logs at DEBUG otherwise
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    for task in by_task:
        idx = [i for i, t in enumerate(labels) if t == task]
        ax.scatter(xy[idx, 0], xy[idx, 1], s=12, label=f"{task} ({len(idx)})")
    ax.set_title("prompt-aware LoRA scales r (t-SNE), by task")
    ax.legend(fontsize=8, markerscale=1.5)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} ({len(prompts)} prompts, {len(by_task)} tasks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
