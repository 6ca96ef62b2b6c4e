"""What the stage-2 prompt adapter reads from an LLM folder, before and after the final norm.

    python examples/wavllm/scripts/prompt_adapter_input_check.py --llm work_real/real_backbones/smollm2-135m-instruct
        [--checkpoint work_real/stage2/checkpoint_last.pt --manifests manifests/real/test_*.tsv]

For a few instructions (the reference's adapter input, '"' + instruction + '"'), prints the norm of every
position's state and the range of a freshly initialised P_d's outputs, for ``model.prompt_adapter_input``
``last_layer`` (the reference's) and ``final_norm``. With ``--checkpoint`` (stage 2), also the spread of the
trained adapter's r over the manifests' instructions: its largest per-feature standard deviation and the
share of r's features on the clamp's flat ends (0 or the clamp) for every instruction.
"""
import argparse
from typing import List

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

INSTRUCTIONS = ["Transcribe the audio.", "What is the speaker's gender?", "Translate the speech into German.",
                "First transcribe the audio, then answer the question in it."]


def _states(model, ids: torch.Tensor):
    captured = {}
    hook = model.model.layers[-1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        out = model.model(input_ids=ids)
    hook.remove()
    return {"last_layer": captured["h"][0], "final_norm": out.last_hidden_state[0]}


def input_scales(llm_dir: str, hidden: int = 128, seed: int = 0) -> None:
    tok = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, dtype=torch.float32).eval()
    torch.manual_seed(seed)
    down = torch.nn.Linear(model.config.hidden_size, hidden)  # P_d at PyTorch's default init
    for text in INSTRUCTIONS:
        ids = tok('"' + text + '"', return_tensors="pt", add_special_tokens=False).input_ids
        for name, t in _states(model, ids).items():
            with torch.no_grad():
                x = down(t)
            norms = [round(v) for v in t.norm(dim=-1).tolist()]
            print(f"{name:10s} {text[:34]!r:38s} norms per position {norms}  P_d outputs "
                  f"{x.min().item():+.1f}..{x.max().item():+.1f}  GELU > 0.01: "
                  f"{(F.gelu(x).abs() > 0.01).float().mean().item():.2f}")


def trained_spread(checkpoint: str, manifests: List[str]) -> None:
    from wavllm_fairseq.evaluation.tsne import prompt_scales
    from wavllm_fairseq.data.manifest import read_manifest
    from wavllm_fairseq.hub import WavLLM

    api = WavLLM.from_pretrained(checkpoint, merge_lora=False)
    prompts = sorted({r.prompt for m in manifests for r in read_manifest(m, require_target=False)[0] if r.prompt})
    r = torch.as_tensor(prompt_scales(api, prompts))
    clamp = api.model.prompt_scale.clamp_max
    ends = ((r == 0) | (r == clamp)).all(dim=0).float().mean().item() if clamp else 0.0
    print(f"{checkpoint}: {len(prompts)} instructions; r mean {r.mean().item():.3f}, largest per-feature std "
          f"{r.std(dim=0).max().item():.2e}; features at 0 or {clamp} for every instruction: {ends:.2f}; "
          f"input {api.model.cfg.prompt_adapter_input}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llm", required=True, help="a Hugging Face LLaMA-family folder")
    p.add_argument("--checkpoint", default="", help="a stage-2 checkpoint: the trained r's spread")
    p.add_argument("--manifests", nargs="*", default=[], help="manifests whose instructions --checkpoint scores")
    args = p.parse_args()
    input_scales(args.llm)
    if args.checkpoint:
        trained_spread(args.checkpoint, args.manifests)


if __name__ == "__main__":
    main()
