#!/usr/bin/env python3
"""Dev-time parity check against the reference implementation's own code (microsoft/SpeechT5, WavLLM/).

    git --git-dir=<SpeechT5 clone>/.git archive HEAD WavLLM | tar -x -C /tmp/ref
    python examples/wavllm/scripts/parity_reference.py --reference-dir /tmp/ref/WavLLM [--llm-layers 1]

Builds a small random model in the reference's own classes (its sizes are hard-coded to the real ones:
Whisper width 1280, WavLM width 768, LLaMA width 4096 with 32 heads and FFN 11008, LoRA R=32/alpha 32;
only some layer counts are small; WavLM keeps its 12 layers, as its 13 softmax layer weights are
hard-coded), saves its state dict as the release stores it (WavLM's weight norm under torch 2.0.1's
``weight_g`` / ``weight_v``; the same save with today's names converts to the same checkpoint, checked),
converts it with ``wavllm-convert-reference-checkpoint``'s code (WavLM from its local folder, the backbone
check on), loads the result with ``WavLLM.from_pretrained`` and compares, on the same audio and prompts:
speech embeddings, the stage-2 scale r, the logits of a forced answer (the decode prefix as the
reference's generator builds it), and greedy tokens (the reference's own SequenceGenerator against this
plugin's generator), for stage 1 (WavLM fed the raw waveform, as microsoft/wavlm-base's
preprocessor_config.json says) and stage 2 (a folder saying do_normalize: true), batch 1 and a padded
batch, three clips over 30 s (the last window's valid Whisper frames 0, 2 and 3 mod 4) and a 44.1 kHz
clip (the reference's own test_data/audio/sqa.wav; the reference resamples it with SoX's ``rate``, run
as the sox program: ``apt-get install sox``, or ``--no-44k``). Text: the reference's tokenizer.model
(LLaMA-2's, shipped in its checkout).

The reference runs in-process with the run-time patches listed in reference_harness.py. What this cannot
compare is printed at the end (``NOT_COMPARED``). Model weights are float32 on the CPU. Prints one line per
comparison and writes them as JSON (--out).
"""
import argparse
import os
import sys
import tempfile

import numpy as np
import soundfile as sf
import torch

import reference_harness as H

NOT_COMPARED = [
    "training: the release has no training forward (its model defines no forward(); the criterion and the "
    "dataset's masks are there, so the loss normalisation was read from its code, not run)",
    "stage-1 decoding as released: its Attention_LoRA only runs with a prompt-adapter scale (stage 2); stage 1 "
    "runs here with the constant alpha/R its _checkpointed_forward uses (patch 3)",
    "sampled tokens: its generator draws from the RNG at each forced right-prompt step too, so equal seeds give "
    "other draws; greedy tokens and the logits sampled from are compared",
    "its own padded batches (they differ from its clips alone: compared is our batch against its clips alone)",
    "real weights: random weights of the real widths, 1 Whisper layer and --llm-layers LLaMA layers",
]
PROMPT_ASR = "Based on the attached audio, generate a comprehensive text transcription of the spoken content."
PROMPT_SQA = ("What will the man do next? A. Start to take exercise; B. Do as he always does; "
              "C. Change his working time.")


def synthetic_clip(rng, seconds: float, f0: float) -> np.ndarray:
    t = np.arange(int(round(seconds * 16000))) / 16000
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
    return (0.3 * env * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * t)) + 0.01 * rng.standard_normal(len(t))
            ).astype(np.float32)


def clips_and_cases(args, rng):
    """The manifest rows (audio: an array at 16 kHz or a file path, prompt, answer) and the cases (name, rows)."""
    rows = [(synthetic_clip(rng, 2.33, 180.0), PROMPT_ASR, "he hoped there would be stew"),
            (synthetic_clip(rng, 1.41, 260.0), PROMPT_ASR, "the cat sat"),
            (synthetic_clip(rng, 1.7, 300.0), "", "yes")]
    cases = [("batch 1 (2.33 s)", [0]), ("batch 1, empty prompt (1.7 s)", [2]),
             ("padded batch (2.33 s + 1.41 s)", [0, 1])]
    if not args.no_long:  # last Whisper window: 260, 262, 263 valid frames (0, 2, 3 mod 4)
        for n, mod in ((563200, 0), (563700, 2), (564100, 3)):
            cases.append((f"batch 1, {n / 16000:.5g} s (last window {mod} mod 4)", [len(rows)]))
            rows.append((synthetic_clip(rng, n / 16000, 220.0), "Is there only one speaker in the audio clip?", "No"))
    if not args.no_44k:
        path = os.path.join(args.reference_dir, "wavllm", "test_data", "audio", "sqa.wav")
        cases.append(("batch 1, 44.1 kHz (reference's sqa.wav)", [len(rows)]))
        rows.append((path, PROMPT_SQA, "A"))
    return rows, cases


def write_manifest(work: str, rows, name: str) -> str:
    from wavllm_fairseq.data.resample import num_frames_16k

    lines = ["id\taudio\tn_frames\tprompt\ttgt_text\twith_speech"]
    for i, (audio, prompt, answer) in enumerate(rows):
        if isinstance(audio, str):
            info = sf.info(audio)
            path, n = audio, num_frames_16k(info.frames, info.samplerate)
        else:
            path, n = os.path.join(work, f"{name}_{i}.wav"), len(audio)
            sf.write(path, audio, 16000, subtype="FLOAT")
        lines.append(f"{i}\t{path}\t{n}\t{prompt}\t{answer}\tTrue")
    with open(os.path.join(work, f"{name}.tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return name


# ----------------------------------------------------------------------------- this plugin's side
def convert_both_namings(ref, work: str, stage: int, tok_path: str, wavlm_dir: str):
    """Save the release both ways, convert both (WavLM from its folder, backbones checked), check they agree."""
    from wavllm_fairseq.tools.convert_reference import convert_checkpoint

    out = {}
    for legacy in (True, False):
        src = os.path.join(work, f"ref_stage{stage}_{'legacy' if legacy else 'today'}.pt")
        dst = os.path.join(work, f"ours_stage{stage}_{'legacy' if legacy else 'today'}.pt")
        H.save_reference_checkpoint(ref, src, legacy_weight_norm=legacy)
        summary = convert_checkpoint(src, dst, arch="parity_reference", tokenizer_dir=tok_path, wavlm_path=wavlm_dir)
        out[legacy] = (dst, summary)
    a = torch.load(out[True][0], weights_only=False)["model"]
    b = torch.load(out[False][0], weights_only=False)["model"]
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return out[True][0], out[True][1], same


def ours_batch(task, split: str, indices):
    from wavllm_fairseq.data.dataset import collate

    ds = task.load_corpus(split, shuffle=False)
    return collate([ds[i] for i in indices], task.tokenizer.pad_id)


def ours_decode_logits(model, batch, answers):
    """Logits of the forced answers after the generation prefix (left-padded), per row: (T_b, V)."""
    prefix = model.build_generation_prefix(batch["net_input"])
    emb = model.llm.get_input_embeddings()
    T = max(len(a) for a in answers)
    ans = torch.zeros(len(answers), T, dtype=torch.long)
    for b, a in enumerate(answers):
        ans[b, : len(a)] = torch.tensor(a)
    x = torch.cat([prefix.embeds, emb(ans)], dim=1)
    mask = torch.cat([prefix.attention_mask, torch.ones_like(ans)], dim=1)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    with model.lora_scale_context(prefix.lora_scale):
        logits = model.llm(inputs_embeds=x, attention_mask=mask, position_ids=pos).logits
    L = prefix.embeds.shape[1]
    # position L-1 predicts answer token 0: the logits before each answer token and before the end
    return [logits[b, L - 1: L - 1 + len(a)] for b, a in enumerate(answers)], prefix.lora_scale


def ours_greedy(model, task, batch, n_new: int):
    from wavllm_fairseq.decoding.options import DecodingOptions

    gen = DecodingOptions(beam_size=1, max_len_b=n_new, loop_guard_ngram=0).build(model, task.target_dictionary)
    hyps = gen.generate([model], batch)
    return {int(i): [t for t in h[0]["tokens"].tolist() if t != 2] for i, h in zip(batch["id"].tolist(), hyps)}


def ours_speech_zero_tail(model, audio: torch.Tensor, n: int) -> torch.Tensor:
    """Speech embeddings (1, N, D) of one clip with its last Whisper window zero-padded past the valid
    frames (what this plugin computed before it read that window whole), from the public modules."""
    lengths = torch.tensor([n])
    sem, sem_len = model.whisper(audio[None, :n], lengths)  # valid frames only
    W = model.whisper.encoder.config.max_source_positions
    parts = []
    for k in range(-(-int(sem_len[0]) // W)):
        window = sem[:, k * W: (k + 1) * W]
        out, out_len = model.semantic_adapter(window, (sem_len - k * W).clamp(0, W))
        parts.append(out[:, : int(out_len[0])] if k == -(-int(sem_len[0]) // W) - 1 else out)
    ac, ac_len = model.acoustic_adapter(*model.wavlm(audio[None, :n], lengths))
    m = min(int(ac_len[0]), sum(p.shape[1] for p in parts))
    return model.projector(torch.cat([torch.cat(parts, dim=1)[:, :m], ac[:, :m]], dim=-1))


def resampler_rows(model, path: str, r_speech: torch.Tensor):
    """Our speech embeddings of a file at another rate, through each resampler, against the reference's."""
    from wavllm_fairseq.data.resample import RESAMPLERS, resample_to_16k

    raw, sr = sf.read(path, dtype="float32")
    sox = H.sox_rate(raw, sr)
    out = {}
    for method in RESAMPLERS:
        wav = resample_to_16k(raw, sr, method)
        n = min(len(wav), len(sox))
        wave = float(np.sqrt(np.mean((wav[:n] - sox[:n]) ** 2) / np.mean(sox[:n] ** 2)))
        speech, speech_len = model.encode_speech(torch.from_numpy(wav)[None], torch.tensor([len(wav)]))
        k = min(int(speech_len[0]), r_speech.shape[1])
        out[method] = (wave, float((speech[0, :k] - r_speech[0, :k]).abs().max()), len(wav), len(sox))
    return out


# ----------------------------------------------------------------------------- comparisons
class Run:
    """One stage's models and the report lines."""

    def __init__(self, args, R, work, split, tok_path, stage, ref, wavlm_dir, api, answers, results):
        self.__dict__.update(args=args, R=R, work=work, split=split, tok_path=tok_path, stage=stage, ref=ref,
                             wavlm_dir=wavlm_dir, model=api.model, task=api.task, answers=answers, results=results)

    def report(self, case, key, value):
        self.results.append({"stage": self.stage, "case": case, "metric": key, "value": value})
        print(f"stage {self.stage}  {case:<40} {key:<38} {value}")

    def ref_row(self, i):
        return H.reference_batch(self.R, self.work, self.split, self.tok_path, self.wavlm_dir, [i])[1]

    def case(self, case, idx, rows):
        model, answers = self.model, self.answers
        ours = ours_batch(self.task, self.split, idx)
        o_speech, o_len = model.encode_speech(ours["net_input"]["audio"], ours["net_input"]["audio_lengths"])
        o_logits, o_r = ours_decode_logits(model, ours, [answers[i] for i in idx])
        o_greedy = ours_greedy(model, self.task, ours, self.args.new_tokens)
        d_speech = d_logit = d_r = scale = 0.0
        lens, r_range, same_tokens, ref_rows = [], [], True, {}
        for b, i in enumerate(idx):  # the reference: each row alone (what a user of the release gets)
            rs = self.ref_row(i)
            r_speech = H.reference_speech(self.ref, rs)
            n = int(o_len[b])
            lens.append(f"{n}/{r_speech.shape[1]}")
            frame_diff = (o_speech[b, :n] - r_speech[0, :n]).abs().amax(-1)
            d_speech = max(d_speech, float(frame_diff.max()))
            off = torch.nonzero(frame_diff > 1e-4).flatten().tolist()
            if off:
                self.report(case, f"  row {i}: frames differing > 1e-4", f"{off[:8]} of {n}")
            right = rs["target"][0, : int(rs["net_input"]["prompt_masks"][0].sum())]
            toks = torch.cat([torch.tensor([1]), right, torch.tensor(answers[i])])[None]
            r_logits, r_r = H.reference_logits(self.ref, rs, r_speech, toks)
            n_ans = len(answers[i])
            ref_rows[i] = r_logits[0, -n_ans - 1: -1]
            d_logit = max(d_logit, float((o_logits[b] - ref_rows[i]).abs().max()))
            scale = max(scale, float(r_logits.abs().max()))
            if self.stage == 2:
                d_r = max(d_r, float((o_r[b] - r_r[0]).abs().max()))
                r_range.append(f"[{float(r_r.min()):.2f}, {float(r_r.max()):.2f}] "
                               f"{float(((r_r > 0) & (r_r < 3)).float().mean()):.0%} unclamped")
            r_greedy = H.reference_greedy(self.R, self.ref, rs, self.args.new_tokens)[i]
            same_tokens &= r_greedy == o_greedy[i]
            if r_greedy != o_greedy[i]:
                print(f"    row {i}: reference {r_greedy} vs ours {o_greedy[i]}")
            self.extras(case, i, rows[i], ours, b, r_speech)
        self.report(case, "speech frames ours/reference", " ".join(lens))
        self.report(case, "speech embeddings max|diff|", f"{d_speech:.3g}")
        if self.stage == 2:
            self.report(case, "r max|diff|", f"{d_r:.3g} (r in {'; '.join(r_range)})")
        self.report(case, "forced-answer logits max|diff|", f"{d_logit:.3g} (logits up to {scale:.3g})")
        self.report(case, f"greedy {self.args.new_tokens} tokens identical", same_tokens)
        return ours, ref_rows

    def extras(self, case, i, row, ours, b, r_speech):
        """The long clips: the last frame with the old zero padding; the 44.1 kHz clip: both resamplers."""
        audio, n = ours["net_input"]["audio"][b], int(ours["net_input"]["audio_lengths"][b])
        if isinstance(row[0], str):
            for method, (wave, speech, n16, nsox) in resampler_rows(self.model, row[0], r_speech).items():
                self.report(case, f"  {method}: waveform / speech vs SoX rate",
                            f"rel. rms {wave:.3g}, speech max|diff| {speech:.3g} ({n16} vs {nsox} samples)")
        elif n > 30 * 16000:
            old = ours_speech_zero_tail(self.model, audio, n)
            m = min(old.shape[1], r_speech.shape[1])
            self.report(case, "  last window zero-padded: last frame",
                        f"max|diff| {float((old[0, m - 1] - r_speech[0, m - 1]).abs().max()):.3g}")

    def ablations(self, case, idx, ours, ref_rows):
        """What the parity rests on: each input detail, switched back on our side (row idx[0], logits)."""
        model, cfg = self.model, self.model.cfg

        def ablate(change, undo):
            change()
            try:
                lg, _ = ours_decode_logits(model, ours, [self.answers[i] for i in idx])
            finally:
                undo()
            return f"{float((lg[0] - ref_rows[idx[0]]).abs().max()):.3g}"

        self.report(case, "  ablation: no <s> after speech",
                    ablate(lambda: setattr(cfg, "decode_bos_after_speech", False),
                           lambda: setattr(cfg, "decode_bos_after_speech", True)))
        norms = [m for m in model.llm.modules() if hasattr(m, "variance_epsilon")]
        self.report(case, "  ablation: RMSNorm eps 1e-5 (HF Llama-2)",
                    ablate(lambda: [setattr(m, "variance_epsilon", 1e-5) for m in norms],
                           lambda: [setattr(m, "variance_epsilon", 1e-6) for m in norms]))
        wavlm = model.wavlm
        self.report(case, f"  ablation: WavLM normalise={not wavlm.normalize}",
                    ablate(lambda: setattr(wavlm, "normalize", not wavlm.normalize),
                           lambda: setattr(wavlm, "normalize", not wavlm.normalize)))


def run_stage(args, R, work, split, tok_path, stage, rows, cases, answers, results):
    from wavllm_fairseq.hub import WavLLM

    normalize = stage == 2
    ref, wavlm_dir = H.build_reference(R, work, stage, args.llm_layers, args.seed, wavlm_normalize=normalize)
    dst, summary, same = convert_both_namings(ref, work, stage, tok_path, wavlm_dir)
    api = WavLLM.from_pretrained(dst, tokenizer_dir=tok_path, merge_lora=False)
    api.task.cfg.data = work
    run = Run(args, R, work, split, tok_path, stage, ref, wavlm_dir, api, answers, results)
    run.report("conversion", "weight_g/weight_v release converted", f"{summary['mapped']} mapped, "
               f"{summary['dropped']} dropped, backbones checked {summary['backbones_checked']}")
    run.report("conversion", "same checkpoint from today's names", same)
    run.report("conversion", "WavLM input (preprocessor_config.json)",
               f"do_normalize={normalize}, ours normalise={api.model.wavlm.normalize}")
    with torch.no_grad():
        for case, idx in cases:
            ours, ref_rows = run.case(case, idx, rows)
            if case == cases[0][0]:
                run.ablations(case, idx, ours, ref_rows)
            if len(idx) > 1:  # the reference's own padded batch against its rows alone
                _, rs = H.reference_batch(R, work, split, tok_path, wavlm_dir, idx)
                rb = H.reference_speech(ref, rs)
                alone = {i: H.reference_speech(ref, run.ref_row(i)) for i in idx}
                diffs = [float((rb[b, : alone[sid].shape[1]] - alone[sid][0]).abs().max())
                         for b, sid in enumerate(rs["id"].tolist())]
                run.report(case, "reference: own batch vs alone (speech)", f"{max(diffs):.3g}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", required=True, help="the WavLLM/ folder of a microsoft/SpeechT5 checkout")
    p.add_argument("--tokenizer", default="", help="LLaMA tokenizer.model (default: the one in the reference checkout)")
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to compare")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--no-long", action="store_true", help="skip the three ~35 s clips (two Whisper windows)")
    p.add_argument("--no-44k", action="store_true", help="skip the 44.1 kHz clip (needs the sox program)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    args.reference_dir = os.path.abspath(args.reference_dir)
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    R = H.install_reference(args.reference_dir)
    tok_path = args.tokenizer or os.path.join(args.reference_dir, "wavllm", "tokenizer", "tokenizer.model")
    work = args.work or tempfile.mkdtemp(prefix="wavllm_parity_")
    os.makedirs(work, exist_ok=True)

    from wavllm_fairseq.data.tokenizer import LlamaTokenizer
    from wavllm_fairseq.models.wavllm import ARCHITECTURES

    # this plugin's sizes of the reference model built above (only used to shape the converted model)
    ARCHITECTURES["parity_reference"] = dict(
        ARCHITECTURES["wavllm_7b"], whisper_layers=1, whisper_ffn_dim=1024, wavlm_layers=12, wavlm_ffn_dim=1024,
        # the LLM folder says 1e-5, as Llama-2's config.json does; the converter's override (1e-6, the
        # reference's ModelArgs.norm_eps) is what makes the two agree
        llama_layers=args.llm_layers, llama_max_positions=2048, llama_rms_norm_eps=1e-5)
    rows, cases = clips_and_cases(args, np.random.default_rng(args.seed))
    split = write_manifest(work, rows, "parity")
    tok = LlamaTokenizer(tok_path)
    answers = [tok.encode(a) for _, _, a in rows]
    results = []
    for stage in [int(s) for s in args.stages.split(",")]:
        run_stage(args, R, work, split, tok_path, stage, rows, cases, answers, results)
    print("not compared:\n  " + "\n  ".join(NOT_COMPARED))
    if args.out:
        H.write_results(args.out, " ".join(sys.argv), results, NOT_COMPARED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
