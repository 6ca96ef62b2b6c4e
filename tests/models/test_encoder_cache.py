"""The frozen-encoder cache: the same loss and gradients as live encoders, stale keys and corrupt records."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tiny_wavllm import make_batch, tiny
from wavllm_fairseq.data.encoder_cache import EncoderCache, attach_encoder_cache, clip_key

LENGTHS = [4000, 6400, 2800]


def loss_and_grads(model, batch):
    torch.manual_seed(1)  # the same LoRA dropout masks in every pass
    model.zero_grad()
    logits, target, _ = model(**batch)
    loss = F.cross_entropy(logits.float(), target)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def encoders_ran(model):
    """Count calls of both frozen encoders."""
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    model.whisper.register_forward_hook(hook)
    model.wavlm.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("prompt_adapter", [False, True])
def test_float32_cache_gives_the_live_loss_and_gradients_exactly(tmp_path, prompt_adapter):
    live = tiny(prompt_adapter=prompt_adapter)
    batch = make_batch(LENGTHS)
    ref_loss, ref_grads = loss_and_grads(live, batch)

    cached = tiny(prompt_adapter=prompt_adapter)
    cache = attach_encoder_cache(cached, str(tmp_path / "cache"), "float32")
    calls = encoders_ran(cached)
    first_loss, first_grads = loss_and_grads(cached, batch)  # fills the cache
    assert calls["n"] == 2 and cache.stats["written"] == 3
    second_loss, second_grads = loss_and_grads(cached, batch)  # reads it: no encoder runs
    assert calls["n"] == 2 and cache.stats["hits"] == 3
    for loss, grads in ((first_loss, first_grads), (second_loss, second_grads)):
        assert torch.equal(loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    # the adapter's WavLM layer weights get their gradient through the stored hidden states
    assert any("layer_weights" in n for n in ref_grads)


def test_a_clip_over_one_whisper_window_is_served_with_its_last_window_whole(tmp_path):
    """wavllm_tiny's window is 2 s: the 41500-sample clip's last window has 30 valid Whisper frames (2 mod 4),
    so its last speech frame reads Whisper's outputs of the mel padding (speech.py, as the reference); the
    record holds them and a float32 cache gives the live loss and gradients exactly."""
    lengths = [4000, 41500, 2800]
    live = tiny()
    batch = make_batch(lengths)
    ref_loss, ref_grads = loss_and_grads(live, batch)
    cached = tiny()
    cache = attach_encoder_cache(cached, str(tmp_path / "cache"), "float32")
    for _ in range(2):  # fills the cache, then reads it
        loss, grads = loss_and_grads(cached, batch)
        assert torch.equal(loss, ref_loss)
        for name in ref_grads:
            assert torch.equal(grads[name], ref_grads[name]), name
    assert cache.stats["written"] == 3 and cache.stats["hits"] == 3
    W = cached.whisper.encoder.config.max_source_positions
    key = cache.key(batch["audio"][1, : lengths[1]].numpy())
    assert cache.get(key)["whisper"].shape[0] == 2 * W > int(cached.whisper.output_lengths(torch.tensor(41500)))


def test_a_cache_filled_with_other_batches_and_a_new_process_matches_within_float_tolerance(tmp_path):
    live = tiny()
    batch = make_batch(LENGTHS)
    ref_loss, ref_grads = loss_and_grads(live, batch)
    for dtype, tol in (("float32", 1e-5), ("float16", 2e-3)):
        filler = tiny()
        attach_encoder_cache(filler, str(tmp_path / dtype), dtype)
        for b in range(len(LENGTHS)):  # one clip per batch, as a pre-filling command may do
            one = {k: (v[b: b + 1] if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.no_grad():
                filler.encode_speech(one["audio"][:, : LENGTHS[b]], one["audio_lengths"])
        filler.encoder_cache.close()
        reader = tiny()
        cache = attach_encoder_cache(reader, str(tmp_path / dtype), dtype)  # reads what the filler wrote
        assert len(cache) == 3
        loss, grads = loss_and_grads(reader, batch)
        assert cache.stats == {"hits": 3, "misses": 0, "corrupt": 0, "written": 0}
        assert abs(float(loss) - float(ref_loss)) <= tol * max(1.0, abs(float(ref_loss)))
        for name, g in ref_grads.items():
            assert torch.allclose(grads[name], g, rtol=50 * tol, atol=tol), (dtype, name)


def test_changed_audio_or_encoder_weights_are_other_keys(tmp_path):
    model = tiny()
    cache = attach_encoder_cache(model, str(tmp_path), "float32")
    batch = make_batch(LENGTHS)
    with torch.no_grad():
        model.encode_speech(batch["audio"], batch["audio_lengths"])
    assert cache.stats["written"] == 3
    # one sample of one clip changed: that clip alone is encoded again
    batch["audio"][1, 10] += 1e-3
    with torch.no_grad():
        model.encode_speech(batch["audio"], batch["audio_lengths"])
    assert cache.stats["written"] == 4 and cache.stats["hits"] == 2
    # another backbone (one weight changed): another fingerprint, another folder, nothing served
    other = tiny()
    with torch.no_grad():
        other.whisper.encoder.layers[0].fc1.weight[0, 0] += 1e-3
    other_cache = attach_encoder_cache(other, str(tmp_path), "float32")
    assert other_cache.fingerprint != cache.fingerprint and other_cache.folder != cache.folder
    assert len(other_cache) == 0
    # the same backbone in another dtype: another fingerprint too
    bf = tiny()
    bf.whisper.to(torch.bfloat16)
    assert bf.encoder_fingerprint()[0] != model.encoder_fingerprint()[0]
    # and the same weights rebuilt from the seed: the same fingerprint (records are found again)
    assert tiny().encoder_fingerprint()[0] == model.encoder_fingerprint()[0]
    # also loaded from another folder (a copied work dir): the path is not content
    moved = tiny()
    moved.whisper.encoder.config._name_or_path = str(tmp_path / "copy" / "whisper")
    moved.wavlm.wavlm.config._name_or_path = str(tmp_path / "copy" / "wavlm")
    assert moved.encoder_fingerprint()[0] == model.encoder_fingerprint()[0]


def test_a_corrupt_or_truncated_record_is_recomputed_and_named(tmp_path, caplog):
    model = tiny()
    cache = attach_encoder_cache(model, str(tmp_path), "float32")
    batch = make_batch(LENGTHS)
    with torch.no_grad():
        ref = model.encode_speech(batch["audio"], batch["audio_lengths"])[0]
    cache.close()
    data = [os.path.join(cache.folder, n) for n in os.listdir(cache.folder) if n.startswith("data-")]
    assert len(data) == 1
    raw = bytearray(open(data[0], "rb").read())
    raw[100] ^= 0xFF  # a flipped byte in the first record
    open(data[0], "wb").write(bytes(raw[:-20]))  # and the last record cut short
    fresh = tiny()
    cache2 = attach_encoder_cache(fresh, str(tmp_path), "float32")
    with caplog.at_level("WARNING"), torch.no_grad():
        out = fresh.encode_speech(batch["audio"], batch["audio_lengths"])[0]
    assert cache2.stats["corrupt"] == 2 and cache2.stats["hits"] == 1 and cache2.stats["written"] == 2
    assert torch.equal(out, ref)
    assert sum("corrupt or truncated" in r.message and data[0] in r.message for r in caplog.records) == 2
    # the records written again are read back clean by the next process
    cache2.close()
    third = attach_encoder_cache(tiny(), str(tmp_path), "float32")
    assert all(third.get(k) is not None for k in list(third._index))


def test_an_interrupted_index_line_is_skipped_not_fatal(tmp_path):
    cache = EncoderCache(str(tmp_path), "f" * 40, "float16")
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    cache.put("a", {"whisper": arr})
    cache.close()
    index = [os.path.join(cache.folder, n) for n in os.listdir(cache.folder) if n.startswith("index-")][0]
    with open(index, "a") as f:
        f.write('{"key": "b", "offs')  # a write cut mid-line
    again = EncoderCache(str(tmp_path), "f" * 40, "float16")
    assert len(again) == 1 and np.array_equal(again.get("a")["whisper"], arr.astype(np.float16))
    assert again.get("b") is None


def test_keys_depend_on_every_sample_and_the_fingerprint():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    y = x.copy()
    y[-1] = np.nextafter(y[-1], 0)
    assert clip_key("a", x) == clip_key("a", x.astype(np.float64))  # the float32 samples the encoders get
    assert clip_key("a", x) != clip_key("a", y) != clip_key("b", x)


def test_the_folder_says_what_encoders_it_holds(tmp_path):
    model = tiny()
    cache = attach_encoder_cache(model, str(tmp_path), "float16")
    info = json.load(open(os.path.join(cache.folder, "encoders.json")))
    assert info["fingerprint"] == cache.fingerprint
    assert info["whisper"]["class"] == "WhisperSemanticEncoder" and info["wavlm"]["class"] == "WavLMAcousticEncoder"
    with pytest.raises(ValueError, match="float16"):
        EncoderCache(str(tmp_path), "x", "bfloat16")
