"""A GPU check anyone can run, nothing downloaded: ``python -m wavllm_fairseq.bench.gpu_check``
(or ``examples/wavllm/scripts/gpu_check.sh``, which installs what is missing first).

Sections, each timed and reported even if a later one fails (``--only`` picks some):

``memory``  ``wavllm_7b`` with random weights in bf16, one training step (forward + backward) of 30 s
            audio + 64 text tokens, stage 1 and stage 2, batch 1/4/8/16, without and with activation
            checkpointing: peak memory and step time (the second of two steps).
``cli``     ``fairseq-hydra-train`` stage 1 then stage 2 with ``common.bf16=true`` on CUDA
            (``wavllm_tiny`` on a small synthetic corpus, tiny_corpus.py, a few hundred updates, with the
            toy yamls of ``--config-dir``), then ``fairseq-generate`` on CUDA: the real command lines,
            return codes and wall times.
``decode``  the decoding benchmark (generate.py) on ``wavllm_7b`` bf16: batch 1 / 8 / 32,
            ours (static + CUDA graphs, with and without a torch.compile'd step) against HF
            ``generate`` (dynamic, and static compiled), and the fraction of the bandwidth limit at
            batch 1 (``--decoders`` picks ours), and each decoder's untimed first call (graph capture,
            compilation).
``invariance`` greedy decoding of a batch of 8 (128 tokens) against each row alone, in bf16 and in
            float32: how many rows differ and the first step where they do.

The results go to ``--out`` (results.json, table.md) and one table is printed at the end.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from ..decoding.options import DecodingOptions
from ..models.config import DTYPES
from . import generate as bench_generate
from .synthetic import TargetDictionary, generation_prefixes, random_model, training_net_input
from .tiny_corpus import write_tiny_corpus

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # wavllm_fairseq: the --user-dir
TOY_CONFIGS = os.path.join(PACKAGE_DIR, "toy", "config", "toy")  # the toy yamls, package data
GiB = 2 ** 30


def memory(args, report) -> None:
    """The ``memory`` section: peak memory and time of training steps (see the module docstring).

    Args:
        args (argparse.Namespace): the parsed command line
        report (dict): the results so far; this section adds its own
    """
    cuda = args.device.startswith("cuda")
    _free()
    report["memory_baseline_gib"] = torch.cuda.memory_allocated() / GiB if cuda else 0.0  # should be ~0
    for stage in args.memory_stages:
        model = random_model(args.arch, args.vocab, args.device, torch.bfloat16, stage=stage)
        model.train()
        weights = torch.cuda.memory_allocated() / GiB if cuda else 0.0
        report.setdefault("memory_weights_gib", weights)
        for ckpt in (False, True):
            model.set_activation_checkpointing(ckpt)
            for batch in args.memory_batches:
                net = training_net_input(batch, args.seconds, 64, args.vocab, args.device)
                try:
                    for _ in range(2):
                        model.zero_grad(set_to_none=True)
                        if cuda:
                            torch.cuda.synchronize()
                            torch.cuda.reset_peak_memory_stats()
                        t = time.perf_counter()
                        logits, target, _ = model(**net)
                        torch.nn.functional.cross_entropy(logits.float(), target).backward()
                        if cuda:
                            torch.cuda.synchronize()
                        dt = time.perf_counter() - t
                    row = {"stage": stage, "batch": batch, "ckpt": ckpt,
                           "peak_gib": torch.cuda.max_memory_allocated() / GiB if cuda else 0.0, "step_s": dt}
                except torch.cuda.OutOfMemoryError:
                    row = {"stage": stage, "batch": batch, "ckpt": ckpt, "peak_gib": None, "step_s": None, "oom": True}
                report.setdefault("memory", []).append(row)
                print("memory", row, flush=True)
                del net
                model.zero_grad(set_to_none=True)
                _free()
        del model
        _free()


def _free() -> None:
    gc.collect()  # a section's models and decoders must not inflate the next one's peaks
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _py(module: str, *argv: str, log: str, timeout: int, cwd: str) -> dict:
    t = time.perf_counter()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    out = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True, cwd=cwd,
                         env=env, timeout=timeout)
    with open(log, "w") as f:
        f.write(out.stdout + out.stderr)
    return {"rc": out.returncode, "wall_s": time.perf_counter() - t, "tail": (out.stdout + out.stderr)[-1500:]}


def missing_configs(config_dir: str) -> str:
    """What the ``cli`` section lacks in a config folder.

    Args:
        config_dir (str): the ``--config-dir`` folder

    Returns:
        str: an error message naming the missing yamls, or '' when both toy yamls are there
    """
    missing = [n for n in ("toy_stage1.yaml", "toy_stage2.yaml") if not os.path.isfile(os.path.join(config_dir, n))]
    if not missing:
        return ""
    return (f"--config-dir {config_dir} has no {' / '.join(missing)}: pass the folder of the toy training configs "
            f"(the package's own: {TOY_CONFIGS})")


def cli(args, report) -> None:
    """The ``cli`` section: the real training and decoding command lines (see the module docstring).

    Args:
        args (argparse.Namespace): the parsed command line
        report (dict): the results so far; this section adds its own
    """
    cuda = args.device.startswith("cuda")
    work = tempfile.mkdtemp(prefix="gpu_cli_")
    corpus = write_tiny_corpus(os.path.join(work, "corpus"), n_train=16)
    configs = os.path.abspath(args.config_dir)
    user_dir = PACKAGE_DIR

    def overrides(save, updates, extra=()):
        return [f"common.user_dir={user_dir}", f"task.data={os.path.dirname(corpus['train_asr'])}",
                f"task.tokenizer_dir={corpus['tok']}", f"checkpoint.save_dir={save}", "model._name=wavllm_tiny",
                "model.whisper_path=", "model.wavlm_path=", f"model.llama_path={corpus['llama']}",
                "model.lora_rank=4", "model.lora_alpha=8.0", "task.train_manifests='train_asr,train_it'",
                "task.train_weights='1,1'", "task.updates_per_epoch=50", f"optimization.max_update={updates}",
                "optimization.lr=[1e-3]", "lr_scheduler.warmup_updates=10", "dataset.batch_size=8",
                "dataset.max_tokens=400000", "dataset.valid_subset=valid_asr",
                f"dataset.validate_interval_updates={updates}", f"checkpoint.save_interval_updates={updates}",
                "common.log_interval=50", "common.seed=3", f"common.bf16={cuda}", f"common.cpu={not cuda}",
                "++model.activation_checkpointing=true", *extra]

    res = {}
    s1, s2 = os.path.join(work, "s1"), os.path.join(work, "s2")
    device_flags = ["--bf16"] if cuda else ["--cpu"]
    res["stage1"] = _py("fairseq_cli.hydra_train", "--config-dir", configs, "--config-name", "toy_stage1",
                        *overrides(s1, args.stage1_updates), log=os.path.join(args.out, "cli_stage1.log"), timeout=300,
                        cwd=work)
    res["stage1"]["updates"] = args.stage1_updates
    print("cli stage 1", {k: v for k, v in res["stage1"].items() if k != "tail"}, flush=True)
    res["stage2"] = _py("fairseq_cli.hydra_train", "--config-dir", configs, "--config-name", "toy_stage2",
                        *overrides(s2, args.stage2_updates,
                                   [f"checkpoint.finetune_from_model={s1}/checkpoint_last.pt"]),
                        log=os.path.join(args.out, "cli_stage2.log"), timeout=300, cwd=work)
    res["stage2"]["updates"] = args.stage2_updates
    print("cli stage 2", {k: v for k, v in res["stage2"].items() if k != "tail"}, flush=True)
    res["generate"] = _py("fairseq_cli.generate", os.path.dirname(corpus["train_asr"]), "--user-dir", user_dir,
                          "--task", "wavllm_instruction", "--tokenizer-dir", corpus["tok"], "--gen-subset",
                          "test_asr", "--path", os.path.join(s2, "checkpoint_last.pt"), "--batch-size", "4",
                          "--required-batch-size-multiple", "1", "--max-len-b", "12", "--scoring", "wer", *device_flags,
                          log=os.path.join(args.out, "cli_generate.log"), timeout=300, cwd=work)
    log = open(os.path.join(args.out, "cli_generate.log")).read()
    res["generate"]["hypotheses"] = log.count("\nH-") + log.startswith("H-")
    print("cli generate", {k: v for k, v in res["generate"].items() if k != "tail"}, flush=True)
    report["cli"] = res


def decode(args, report) -> None:
    """The ``decode`` section: the decoding benchmark (generate.py), its results kept in the report.

    Args:
        args (argparse.Namespace): the parsed command line
        report (dict): the results so far; this section adds its own
    """
    path = os.path.join(args.out, "decode.json")
    argv = ["--arch", args.arch, "--device", args.device, "--dtype", "bfloat16", "--vocab", str(args.vocab),
            "--batch", *map(str, args.decode_batches), "--new-tokens", str(args.new_tokens), "--repeats", "2",
            "--skip-uncached", "--decoders", *args.decoders, "hf", "--json", path]
    if not args.no_hf_static:
        argv.append("--hf-static")
    bench_generate.main(argv)
    report["decode"] = json.load(open(path))


def invariance(args, report) -> None:
    """The ``invariance`` section: greedy rows decoded in a batch against each alone, per dtype.

    Args:
        args (argparse.Namespace): the parsed command line
        report (dict): the results so far; this section adds its own
    """
    res = {}
    for name in ("bfloat16", "float32"):
        model = random_model(args.arch, args.vocab, args.device, DTYPES[name], stage=1)
        eos = model.llm.config.eos_token_id
        prefix = generation_prefixes(model, 8, args.vocab, device=args.device)
        N = args.new_tokens
        g = DecodingOptions(max_len_b=N, min_len=N).build(model, TargetDictionary(eos))
        with torch.no_grad():
            together = [h[0]["tokens"].tolist() for h in g.decode(prefix, [N] * 8, list(range(8)))]
            differ, first = 0, []
            for b in range(8):
                n = int(prefix.attention_mask[b].sum())
                one = type(prefix)(embeds=prefix.embeds[b: b + 1, -n:],
                                   attention_mask=prefix.attention_mask[b: b + 1, -n:], lora_scale=None)
                alone = g.decode(one, [N], [b])[0][0]["tokens"].tolist()
                if alone != together[b]:
                    differ += 1
                    first.append(next(i for i, (x, y) in enumerate(zip(alone, together[b])) if x != y))
        res[name] = {"rows": 8, "rows_differing": differ, "first_differing_steps": first}
        print("invariance", name, res[name], flush=True)
        del model, g
        _free()
    report["invariance"] = res


def table(report) -> str:
    """The report as markdown tables.

    Args:
        report (dict): the sections' results

    Returns:
        str: what is printed at the end and written to table.md
    """
    lines = [f"GPU check, {report.get('gpu')}, torch {torch.__version__}, {report.get('date')}", ""]
    if report.get("memory"):
        lines += [f"Training step, {report.get('arch')} bf16 weights ({report.get('memory_weights_gib', 0):.1f} GiB), "
                  "30 s audio + 64 text tokens: peak GiB / step s", "",
                  "| stage | batch | no checkpointing | activation checkpointing |", "|---|---|---|---|"]
        rows = {}
        for r in report["memory"]:
            cell = "OOM" if r.get("oom") else f"{r['peak_gib']:.1f} GiB / {r['step_s']:.2f} s"
            rows.setdefault((r["stage"], r["batch"]), {})[r["ckpt"]] = cell
        for (stage, batch), c in sorted(rows.items()):
            lines.append(f"| {stage} | {batch} | {c.get(False, '-')} | {c.get(True, '-')} |")
        lines.append("")
    if report.get("cli"):
        c = report["cli"]
        lines += ["| real CLI on CUDA (bf16) | rc | wall s |", "|---|---|---|"]
        for k in ("stage1", "stage2", "generate"):
            if k in c:
                extra = (f" ({c[k].get('updates')} updates)" if "updates" in c[k]
                         else f" ({c[k].get('hypotheses')} hypotheses)")
                lines.append(f"| {k}{extra} | {c[k]['rc']} | {c[k]['wall_s']:.0f} |")
        lines.append("")
    if report.get("decode"):
        d = report["decode"]
        lines += [f"Greedy decoding, {d['arch']} bf16, {report.get('new_tokens')} new tokens; "
                  f"bandwidth limit at batch 1: {d.get('limit_tokens_per_s') or 0:.0f} tokens/s", ""]
        names = sorted({k for r in d["results"] for k in r["tokens_per_s"]})
        lines += ["| batch | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in d["results"]:  # tokens/s, and at batch 1 the fraction of the bandwidth limit
            fr = r.get("fraction_of_bandwidth_limit_by_decoder") or {}
            lines.append(f"| {r['batch']} | " + " | ".join(
                f"{r['tokens_per_s'].get(n, 0):.1f}" + (f" ({100 * fr[n]:.0f}%)" if n in fr else "")
                for n in names) + " |")
        first = d["results"][0].get("first_call_s") if d["results"] else None
        if first:  # the untimed first call: graph capture, and compilation for a compiled step
            lines += ["", f"First call at batch {d['results'][0]['batch']} (capture, compilation): "
                      + ", ".join(f"{n} {t:.1f} s" for n, t in sorted(first.items()))]
        lines.append("")
    if report.get("invariance"):
        lines += ["| greedy, batch of 8 vs each row alone (128 tokens) | rows differing | first differing steps |",
                  "|---|---|---|"]
        for k, v in report["invariance"].items():
            lines.append(f"| {k} | {v['rows_differing']} of {v['rows']} | {v['first_differing_steps']} |")
    if report.get("errors"):
        lines += ["", "errors: " + "; ".join(f"{k}: {v}" for k, v in report["errors"].items())]
    return "\n".join(lines)


def main(argv=None) -> int:
    """The command line (module docstring).

    Args:
        argv (Optional[List[str]]): the arguments (default: ``sys.argv[1:]``)

    Returns:
        int: the exit status
    """
    p = argparse.ArgumentParser(prog="wavllm-gpu-check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="gpu_check_out")
    p.add_argument("--only", nargs="*", default=["memory", "cli", "decode", "invariance"])
    p.add_argument("--memory-batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--memory-stages", type=int, nargs="+", default=[1, 2])
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--decoders", nargs="+", default=["static", "compiled"], choices=("static", "compiled", "dynamic"),
                   help="our decoders in the decode section (HF generate is always timed)")
    p.add_argument("--stage1-updates", type=int, default=300)
    p.add_argument("--stage2-updates", type=int, default=150)
    p.add_argument("--no-hf-static", action="store_true", help="skip HF's compiled static-cache generate")
    p.add_argument("--config-dir", default=TOY_CONFIGS,
                   help="folder of the toy training yamls (toy_stage1 / toy_stage2) the cli section trains with")
    # for a CPU smoke test of the script itself (tests/test_gpu_check.py); the check is meant for a GPU
    p.add_argument("--device", default="cuda")
    p.add_argument("--arch", default="wavllm_7b")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seconds", type=float, default=30.0, help="audio per row in the memory section")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per row in the invariance section")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (--device cpu only smoke-tests the script)", file=sys.stderr)
        return 2
    if "cli" in args.only and missing_configs(args.config_dir):
        print(f"wavllm-gpu-check: {missing_configs(args.config_dir)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    report = {"gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "date": time.strftime("%Y-%m-%d"), "seconds": {}, "arch": args.arch, "new_tokens": args.new_tokens}
    sections = {"memory": memory, "cli": cli, "decode": decode, "invariance": invariance}
    for name in args.only:
        t = time.perf_counter()
        try:
            sections[name](args, report)
        except Exception as e:  # report and go on: each section stands alone
            traceback.print_exc()
            report.setdefault("errors", {})[name] = f"{type(e).__name__}: {str(e)[:500]}"
        report["seconds"][name] = time.perf_counter() - t
        _free()
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(args.out, "table.md"), "w") as f:
            f.write(table(report) + "\n")
        print(f"[gpu_check] {name} done in {report['seconds'][name]:.0f} s", flush=True)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
