#!/usr/bin/env python3
"""Dev-time parity check against the reference implementation's own code (microsoft/SpeechT5, WavLLM/).

    git --git-dir=<SpeechT5 clone>/.git archive HEAD WavLLM | tar -x -C /tmp/ref
    python examples/wavllm/scripts/parity_reference.py --reference-dir /tmp/ref/WavLLM [--llm-layers 1]

Builds a small random model in the reference's own classes (its sizes are hard-coded to the real ones:
Whisper width 1280, WavLM width 768, LLaMA width 4096 with 32 heads and FFN 11008, LoRA R=32/alpha 32;
only some layer counts are small; WavLM keeps its 12 layers, as its 13 softmax layer
weights are hard-coded), saves its state dict as the reference saves a checkpoint, converts it
with ``wavllm-convert-reference-checkpoint``'s code, loads the result with ``WavLLM.from_pretrained`` and
compares, on the same audio and prompts: speech embeddings, the stage-2 scale r, the logits of a forced
answer (the decode prefix as the reference's generator builds it, and the training sequence), and
greedy tokens (the reference's own SequenceGenerator against this plugin's generator), for stage 1 and
stage 2, batch 1 and a padded batch, plus one clip over 30 s. Text: the reference's tokenizer.model
(LLaMA-2's, shipped in its checkout).

The reference is imported from ``--reference-dir`` at run time only; this project never contains or
imports it otherwise. Patches applied at run time (the checkout on disk is not modified) because the
reference cannot run as is here:
  1. ``torchaudio`` is not installed (it breaks transformers imports on CPU-only machines): a stub module
     stands in while the reference's dataset module is imported (it only uses it for manifests with
     start/end frame columns), and fairseq's ``get_waveform`` (whose resampling step needs torchaudio)
     is replaced in that module by a soundfile read: the clips are written at 16 kHz mono float.
  2. transformers 5 changed ``WhisperEncoder.forward`` (no positional head_mask/output_* arguments) and
     ``WavLMEncoder`` (hidden states are only collected by the top-level model): the reference's
     ``WhisperEncoder.forward`` (HF encoder, then trim to the longest valid length from the feature
     extractor's attention mask) and ``FairseqWavLMEncoder.forward`` (WavLM's feature extractor, mask,
     projection and encoder -- i.e. ``WavLMModel.forward`` with all hidden states -- then the softmax
     layer weights, subsampler, adapter, projector) are replaced by the same computations.
  3. The released ``Attention_LoRA.forward`` only runs stage 2 (with ``pooled_scale_output=None`` it
     leaves xq undefined); stage 1 passes its LoRA scaling ``alpha / R`` as a constant r, the math its
     ``_checkpointed_forward`` (the stage-1 path) uses.
  4. The reference hard-codes hub ids ("openai/whisper-large-v2", "microsoft/wavlm-base") and a 32-layer
     LLaMA in its model constructor: its building blocks (FairseqWhisperEncoder, FairseqWavLMEncoder,
     LLAMA/ModelArgs, the 4096 -> 4096 projector) are built here directly from local configs.
Model weights are float32 on the CPU. Prints one line per comparison and writes them as JSON (--out).
"""
import argparse
import json
import os
import sys
import tempfile
import types

import numpy as np
import torch


def _install_reference(ref_dir: str):
    """Import the reference package ``wavllm`` from ``ref_dir`` (patches 1-3)."""
    if not os.path.isdir(os.path.join(ref_dir, "wavllm")):
        raise SystemExit(f"--reference-dir must be the WavLLM folder of a SpeechT5 checkout (with wavllm/): {ref_dir}")
    sys.path.insert(0, ref_dir)
    import wavllm.models.llama as ref_llama
    import wavllm.models.wavlm as ref_wavlm
    import wavllm.models.whisper_encoder as ref_whisper
    from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

    def whisper_forward(self, input_features, attention_mask=None, head_mask=None, output_attentions=None,
                        output_hidden_states=None, return_dict=None):  # patch 2
        last = HFWhisperEncoder.forward(self, input_features).last_hidden_state
        out_len = self._get_feat_extract_output_lengths(attention_mask.sum(-1))
        return ref_whisper.WhisperOutput(last_hidden_state=last[:, : out_len.max()], output_lengths=out_len)

    ref_whisper.WhisperEncoder.forward = whisper_forward

    def wavlm_forward(self, src_tokens, attention_mask, prompt_embedding=None):  # patch 2 (WavLM)
        out = self.model(src_tokens, attention_mask=attention_mask, output_hidden_states=True)
        frames = self.model._get_feature_vector_attention_mask(out.last_hidden_state.shape[1], attention_mask)
        weights = torch.nn.functional.softmax(self.output_weights, dim=0)
        x = torch.stack([h * w for h, w in zip(out.hidden_states, weights)]).sum(dim=0)
        x, lengths = self.subsample(x, frames.sum(-1).to(torch.long))
        x = self.projector(self.adapter(x.transpose(0, 1).contiguous()))
        return {"encoder_out": x, "encoder_padding_mask": ref_wavlm.lengths_to_mask(lengths)}

    ref_wavlm.FairseqWavLMEncoder.forward = wavlm_forward
    lora_forward = ref_llama.Attention_LoRA.forward

    def stage1_lora_forward(self, x, start_pos, freqs_cis, mask, index, lora_index, lora_weights,
                            pooled_scale_output, is_prompt=False, incremental_state=None, **kw):  # patch 3
        if pooled_scale_output is None and not is_prompt:
            pooled_scale_output = x.new_full((x.shape[0], x.shape[-1]), self.scaling)
        return lora_forward(self, x, start_pos, freqs_cis, mask, index, lora_index, lora_weights,
                            pooled_scale_output, is_prompt, incremental_state, **kw)

    ref_llama.Attention_LoRA.forward = stage1_lora_forward
    import transformers  # noqa: F401  (imported before the stub below: it probes for torchaudio)
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor  # noqa: F401

    stub = "torchaudio" not in sys.modules
    if stub:  # patch 1, for the one import below only
        sys.modules["torchaudio"] = types.ModuleType("torchaudio")
    try:
        import wavllm.data.speechllm_dataset as ref_data
    finally:
        if stub:
            del sys.modules["torchaudio"]
    import soundfile as sf

    def get_waveform(path, always_2d=False, output_sample_rate=None, **kw):  # patch 1: no torchaudio resampling
        wav, sr = sf.read(path, dtype="float32", always_2d=always_2d)
        assert output_sample_rate in (None, sr), "the parity clips are written at 16 kHz mono"
        return wav, sr

    ref_data.get_waveform = get_waveform
    import wavllm.data.tokenizer as ref_tok
    import wavllm.inference.sequence_generator as ref_gen
    import wavllm.models.speechllm_model as ref_model
    return types.SimpleNamespace(llama=ref_llama, wavlm=ref_wavlm, whisper=ref_whisper, data=ref_data,
                                 tok=ref_tok, gen=ref_gen, model=ref_model)


def build_reference(R, work: str, stage: int, llm_layers: int, seed: int):
    """A SpeechLLMModel of the reference's classes with random weights (patch 4), eval mode."""
    from fairseq.models import BaseFairseqModel
    from transformers import WavLMConfig, WavLMModel, WhisperConfig

    torch.manual_seed(seed)
    wdir, vdir = os.path.join(work, "whisper_cfg"), os.path.join(work, "wavlm")
    WhisperConfig(d_model=1280, encoder_layers=1, encoder_attention_heads=20, encoder_ffn_dim=1024, num_mel_bins=80,
                  max_source_positions=1500, decoder_layers=1, decoder_attention_heads=20,
                  vocab_size=64).save_pretrained(wdir)
    WavLMModel(WavLMConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1024,
                           conv_dim=(512,) * 7)).save_pretrained(vdir)
    args = types.SimpleNamespace(whisper_path=wdir, wavlm_path=vdir, wavlm_plus=False, wavlm_plus_weight=False,
                                 wavlm_plus_1layer=False, wavlm_plus_1layer_5=False, wavlm_plus_5layer=False,
                                 wavlm_output_weight=True, wavlm_output_weight_by_prompts=False,
                                 wavlm_first_7_layers=False)
    model = R.model.SpeechLLMModel.__new__(R.model.SpeechLLMModel)
    BaseFairseqModel.__init__(model)
    model.audio_encoder = R.whisper.FairseqWhisperEncoder(args)
    model.wavlm_encoder = R.wavlm.FairseqWavLMEncoder(args)
    model.wavlm_audio_proj = torch.nn.Linear(4096, 4096)
    margs = R.llama.ModelArgs(n_layers=llm_layers, use_lora=True, lora_r=32, lora_alpha=32,
                              second_stage_update_scale=(stage == 2), scale_with_audio=False, scale_0_1=False)
    decoder = torch.nn.Module()
    decoder.model_llama = R.llama.LLAMA(margs)
    decoder.forward_generate = lambda *a, **k: (decoder.model_llama.forward_generate(*a, **k), None)
    decoder.reorder_incremental_state_scripting = decoder.model_llama.reorder_incremental_state_scripting
    model.gpt_model = decoder
    model.audio_proj = torch.nn.Linear(2048, 4096)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():  # LoRA B (zeros at init) and the big LLM matrices
            if name.endswith("_lora_B"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif "model_llama" in name and p.dim() == 2 and "lora" not in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        model.wavlm_encoder.output_weights.copy_(torch.randn(13, generator=g))
        if stage == 2:  # r in a useful range (relu/clamp(max=3) active but not saturated)
            model.gpt_model.model_llama.scale_fc_2.bias.copy_(1.0 + 0.5 * torch.randn(4096, generator=g))
    return model.eval()


def save_reference_checkpoint(model, path: str):
    state = {k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "cfg": {"task": {"lora_r": 32, "lora_alpha": 32}}}, path)


def write_manifest(work: str, clips, prompts, targets, name: str):
    import soundfile as sf

    rows = ["id\taudio\tn_frames\tprompt\ttgt_text\twith_speech"]
    for i, (wav, p, t) in enumerate(zip(clips, prompts, targets)):
        path = os.path.join(work, f"{name}_{i}.wav")
        sf.write(path, wav, 16000, subtype="FLOAT")
        rows.append(f"{i}\t{path}\t{len(wav)}\t{p}\t{t}\tTrue")
    with open(os.path.join(work, f"{name}.tsv"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return name


def reference_batch(R, work: str, split: str, tokenizer_path: str, indices):
    from transformers import Wav2Vec2FeatureExtractor, WhisperFeatureExtractor

    cfg = types.SimpleNamespace(audio_root="", alpaca_text=True, prompt_bulid=True, shuffle=False,
                                prepend_tgt_lang_tag=False, use_audio_input=True, use_sample_rate=16000,
                                is_whisper=True, use_wavlm=True, whisper_token_len=64)
    ds = R.data.SpeechLLMDataset(cfg, work, split, False, text_tokenizer=R.tok.Tokenizer(tokenizer_path),
                                 audio_processor=WhisperFeatureExtractor(feature_size=80),
                                 wavlm_processor=Wav2Vec2FeatureExtractor(do_normalize=False,
                                                                          return_attention_mask=True))
    return ds, ds.collater([ds[i] for i in indices])


def reference_speech(model, sample):
    net = sample["net_input"]
    enc, _ = model.audio_encoder.forward_torchscript(net)
    wav, _ = model.wavlm_encoder.forward_torchscript(net)
    n = min(enc["encoder_out"].size(1), wav["encoder_out"].size(1))
    return model.wavlm_audio_proj(torch.cat([enc["encoder_out"][:, :n], wav["encoder_out"][:, :n]], dim=2))


def reference_logits(model, sample, speech, tokens):
    """The reference LLAMA's forward_generate at start_pos 0 on [left][speech][tokens] -> (B, T, V), r."""
    net = sample["net_input"]
    llama = model.gpt_model.model_llama
    out = llama.forward_generate(0, tokens, 0, None, {"encoder_out": speech}, net["index"], net["orig_prompts"],
                                 left_prompts=net["left_prompts"], incremental_state={})
    return out[:, -tokens.shape[1]:], llama.infer_pooled_prompt_output


def reference_greedy(R, model, sample, n_new: int):
    from fairseq import search

    class Dict:  # what SequenceGenerator reads of the task's dictionary
        def __len__(self):
            return 32000

        def pad(self):
            return 0

        def unk(self):
            return 0

        def eos(self):
            return 2

    prefix_size = int(sample["net_input"]["prompt_masks"].sum(-1).max())
    gen = R.gen.SequenceGenerator([model], Dict(), beam_size=1, max_len_a=0, max_len_b=prefix_size + n_new,
                                  search_strategy=search.BeamSearch(Dict()), n_words=32000)
    hyps = gen.generate([model], sample, prefix_tokens=sample["target"][:, :prefix_size])
    out = {}
    for i, sid in enumerate(sample["id"].tolist()):
        plen = int(sample["net_input"]["prompt_masks"][i].sum())
        out[sid] = [t for t in hyps[i][0]["tokens"].tolist()[plen:] if t != 2]
    return out


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
    from wavllm_fairseq.decoding.generator import WavLLMGenerator

    gen = WavLLMGenerator([model], task.target_dictionary, beam_size=1, max_len_b=n_new, loop_guard_ngram=0)
    hyps = gen.generate([model], batch)
    return {int(i): [t for t in h[0]["tokens"].tolist() if t != 2] for i, h in zip(batch["id"].tolist(), hyps)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-dir", required=True, help="the WavLLM/ folder of a microsoft/SpeechT5 checkout")
    p.add_argument("--tokenizer", default="", help="LLaMA tokenizer.model (default: the one in the reference checkout)")
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to compare")
    p.add_argument("--stages", default="1,2")
    p.add_argument("--no-long", action="store_true", help="skip the 35 s clip (two Whisper windows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    R = _install_reference(os.path.abspath(args.reference_dir))
    tok_path = args.tokenizer or os.path.join(args.reference_dir, "wavllm", "tokenizer", "tokenizer.model")
    work = args.work or tempfile.mkdtemp(prefix="wavllm_parity_")
    os.makedirs(work, exist_ok=True)

    from wavllm_fairseq.tools.convert_reference import convert_checkpoint
    from wavllm_fairseq.hub import WavLLM
    from wavllm_fairseq.models.wavllm import ARCHITECTURES

    # this plugin's sizes of the reference model built above (only used to shape the converted model)
    ARCHITECTURES["parity_reference"] = dict(
        ARCHITECTURES["wavllm_7b"], whisper_layers=1, whisper_ffn_dim=1024, wavlm_layers=12, wavlm_ffn_dim=1024,
        # the LLM folder says 1e-5, as Llama-2's config.json does; the converter's override (1e-6, the
        # reference's ModelArgs.norm_eps) is what makes the two agree
        llama_layers=args.llm_layers, llama_max_positions=2048, llama_rms_norm_eps=1e-5)

    rng = np.random.default_rng(args.seed)

    def clip(seconds, f0):
        t = np.arange(int(seconds * 16000)) / 16000
        env = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)
        return (0.3 * env * np.sin(2 * np.pi * f0 * t * (1 + 0.1 * t))
                + 0.01 * rng.standard_normal(len(t))).astype(np.float32)

    prompts = ["Based on the attached audio, generate a comprehensive text transcription of the spoken content.",
               "Based on the attached audio, generate a comprehensive text transcription of the spoken content.",
               "", "Is there only one speaker in the audio clip?"]
    clips = [clip(2.33, 180.0), clip(1.41, 260.0), clip(1.7, 300.0), clip(35.2, 220.0)]
    answers_text = ["he hoped there would be stew", "the cat sat", "yes", "No"]
    split = write_manifest(work, clips, prompts, answers_text, "parity")
    results = []

    def report(stage, case, key, value):
        results.append({"stage": stage, "case": case, "metric": key, "value": value})
        print(f"stage {stage}  {case:<34} {key:<34} {value}")

    from wavllm_fairseq.data.tokenizer import LlamaTokenizer

    tok = LlamaTokenizer(tok_path)
    answers = [tok.encode(a) for a in answers_text]
    cases = [("batch 1 (2.33 s)", [0]), ("batch 1, empty prompt (1.7 s)", [2]),
             ("padded batch (2.33 s + 1.41 s)", [0, 1])]
    if not args.no_long:
        cases.append(("batch 1, 35.2 s (2 Whisper windows)", [3]))
    for stage in [int(s) for s in args.stages.split(",")]:
        ref = build_reference(R, work, stage, args.llm_layers, args.seed)
        src, dst = os.path.join(work, f"ref_stage{stage}.pt"), os.path.join(work, f"ours_stage{stage}.pt")
        save_reference_checkpoint(ref, src)
        convert_checkpoint(src, dst, arch="parity_reference", tokenizer_dir=tok_path)
        api = WavLLM.from_pretrained(dst, tokenizer_dir=tok_path, merge_lora=False)
        model, task = api.model, api.task
        task.cfg.data = work
        with torch.no_grad():
            for case, idx in cases:
                ours = ours_batch(task, split, idx)
                o_speech, o_len = model.encode_speech(ours["net_input"]["audio"], ours["net_input"]["audio_lengths"])
                o_logits, o_r = ours_decode_logits(model, ours, [answers[i] for i in idx])
                o_greedy = ours_greedy(model, task, ours, args.new_tokens)
                d_speech = d_logit = d_r = 0.0
                ref_rows, r_range = {}, []

                def ablate(change, undo):
                    """max |logit diff| of row idx[0] with one input detail changed on our side"""
                    change()
                    try:
                        lg, _ = ours_decode_logits(model, ours, [answers[i] for i in idx])
                    finally:
                        undo()
                    return float((lg[0] - ref_rows[idx[0]]).abs().max())
                same_tokens = True
                lens = []
                for b, i in enumerate(idx):
                    # reference: each row alone (its batch-of-one behaviour, what a user of the release gets)
                    rds, rs = reference_batch(R, work, split, tok_path, [i])
                    r_speech = reference_speech(ref, rs)
                    n = int(o_len[b])
                    lens.append(f"{n}/{r_speech.shape[1]}")
                    frame_diff = (o_speech[b, :n] - r_speech[0, :n]).abs().amax(-1)
                    d_speech = max(d_speech, float(frame_diff.max()))
                    off = torch.nonzero(frame_diff > 1e-4).flatten().tolist()
                    if off:
                        report(stage, case, f"  row {i}: frames differing > 1e-4", f"{off} of {n}")
                    right = rs["target"][0, : int(rs["net_input"]["prompt_masks"][0].sum())]
                    toks = torch.cat([torch.tensor([1]), right, torch.tensor(answers[i])])[None]
                    r_logits, r_r = reference_logits(ref, rs, r_speech, toks)
                    n_ans = len(answers[i])
                    d_logit = max(d_logit, float((o_logits[b] - r_logits[0, -n_ans - 1: -1]).abs().max()))
                    scale = float(r_logits.abs().max())
                    ref_rows[i] = r_logits[0, -n_ans - 1: -1]
                    if stage == 2:
                        d_r = max(d_r, float((o_r[b] - r_r[0]).abs().max()))
                        r_range.append(f"[{float(r_r.min()):.2f}, {float(r_r.max()):.2f}] "
                                       f"{float(((r_r > 0) & (r_r < 3)).float().mean()):.0%} unclamped")
                    r_greedy = reference_greedy(R, ref, rs, args.new_tokens)[i]
                    same_tokens &= r_greedy == o_greedy[i]
                    if r_greedy != o_greedy[i]:
                        print(f"    row {i}: reference {r_greedy} vs ours {o_greedy[i]}")
                report(stage, case, "speech frames ours/reference", " ".join(lens))
                report(stage, case, "speech embeddings max|diff|", f"{d_speech:.3g}")
                if stage == 2:
                    report(stage, case, "r max|diff|", f"{d_r:.3g} (r in {'; '.join(r_range)})")
                report(stage, case, "forced-answer logits max|diff|", f"{d_logit:.3g} (logits up to {scale:.3g})")
                if case == cases[0][0]:  # what the parity rests on: each input detail, switched back
                    report(stage, case, "  ablation: no <s> after speech",
                           f"""{ablate(lambda: setattr(model.cfg, 'decode_bos_after_speech', False),
                                       lambda: setattr(model.cfg, 'decode_bos_after_speech', True)):.3g}""")
                    norms = [m for m in model.llm.modules() if hasattr(m, "variance_epsilon")]
                    report(stage, case, "  ablation: RMSNorm eps 1e-5 (HF Llama-2)",
                           f"""{ablate(lambda: [setattr(m, 'variance_epsilon', 1e-5) for m in norms],
                                       lambda: [setattr(m, 'variance_epsilon', 1e-6) for m in norms]):.3g}""")
                report(stage, case, f"greedy {args.new_tokens} tokens identical", same_tokens)
                if len(idx) > 1:  # the reference's own padded batch against its rows alone
                    _, rs = reference_batch(R, work, split, tok_path, idx)
                    rb = reference_speech(ref, rs)
                    alone = [reference_speech(ref, reference_batch(R, work, split, tok_path, [i])[1]) for i in idx]
                    diffs = []
                    for b, sid in enumerate(rs["id"].tolist()):
                        a = alone[idx.index(sid)]
                        diffs.append(float((rb[b, : a.shape[1]] - a[0]).abs().max()))
                    report(stage, case, "reference: own batch vs alone (speech)", f"{max(diffs):.3g}")
        ref = api = model = None  # free this stage's models before the next is built
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
