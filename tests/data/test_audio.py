"""Audio loading (formats, rates, channels, zip slices, every error reason)."""
import logging
import os
import struct
import zipfile

import numpy as np
import pytest
import soundfile as sf

from wavllm_fairseq.data.audio import (SAMPLE_RATE, SILENCE_PEAK, AudioSpec, audio_num_frames, load_audio,
                                       num_frames_16k, parse_audio_spec, resample_to_16k)
from wavllm_fairseq.errors import AudioError


def sine(sr, n, freq=440.0, amp=0.5):
    return (amp * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def write(path, data, sr, **kw):
    sf.write(str(path), data, sr, **kw)
    return str(path)


def zip_member_spec(zip_path, member):
    """fairseq's ``file.zip:offset:length`` for a STORED member, offset read from its local header."""
    with zipfile.ZipFile(zip_path) as z:
        info = z.getinfo(member)
    with open(zip_path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return f"{os.path.basename(zip_path)}:{info.header_offset + 30 + name_len + extra_len}:{info.file_size}"


def reason_of(fn, *args, **kw):
    with pytest.raises(AudioError) as e:
        fn(*args, **kw)
    return e.value


# ------------------------------------------------------------------------------------------ specs
def test_parse_audio_spec(tmp_path):
    root = str(tmp_path)
    assert parse_audio_spec("a/b.wav", root) == AudioSpec(os.path.join(root, "a", "b.wav"))
    assert parse_audio_spec("/x/y.flac", root) == AudioSpec("/x/y.flac")
    assert parse_audio_spec("f.zip:120:3400", root) == AudioSpec(os.path.join(root, "f.zip"), 120, 3400)
    assert parse_audio_spec("odd:name.wav", root).offset is None  # only *.zip:<int>:<int> is a slice
    assert reason_of(parse_audio_spec, "-", root).reason == "missing"


# ------------------------------------------------------------------------------------------ loading
def test_wav_16k_is_read_unchanged(tmp_path):
    x = sine(SAMPLE_RATE, 4000)
    write(tmp_path / "a.wav", x, SAMPLE_RATE, subtype="FLOAT")
    y = load_audio("a.wav", str(tmp_path))
    assert y.dtype == np.float32 and y.shape == (4000,)
    np.testing.assert_array_equal(y, x)
    assert audio_num_frames("a.wav", str(tmp_path)) == 4000


def test_flac_and_ogg(tmp_path):
    x = sine(SAMPLE_RATE, 8000)
    pcm = np.round(x * 32767) / 32767
    write(tmp_path / "a.flac", pcm, SAMPLE_RATE, subtype="PCM_16")
    write(tmp_path / "a.ogg", x, SAMPLE_RATE)
    np.testing.assert_allclose(load_audio("a.flac", str(tmp_path)), pcm, atol=1e-4)  # lossless
    ogg = load_audio("a.ogg", str(tmp_path))  # lossy: same length, close values
    assert len(ogg) == 8000 and np.abs(ogg - x)[1000:7000].max() < 0.05
    for name in ("a.flac", "a.ogg"):
        assert audio_num_frames(name, str(tmp_path)) == len(load_audio(name, str(tmp_path)))


def test_stereo_44k_mixdown_and_resample(tmp_path):
    n = 44100  # 1 s at 44.1 kHz -> 16000 samples (up 160, down 441)
    left, right = sine(44100, n, amp=0.6), sine(44100, n, amp=0.2)
    write(tmp_path / "st.wav", np.stack([left, right], 1), 44100, subtype="FLOAT")
    y = load_audio("st.wav", str(tmp_path))
    assert len(y) == 16000 == audio_num_frames("st.wav", str(tmp_path))
    expected = sine(SAMPLE_RATE, 16000, amp=0.4)  # mean of the channels, 440 Hz survives resampling
    assert np.abs(y - expected)[200:-200].max() < 2e-3
    # mean, not sum or first channel: opposite channels cancel to silence
    write(tmp_path / "anti.wav", np.stack([left, -left], 1), 44100, subtype="FLOAT")
    assert np.abs(load_audio("anti.wav", str(tmp_path))).max() < SILENCE_PEAK


@pytest.mark.parametrize("sr,n,expected", [(8000, 4000, 8000), (44100, 1000, 363), (22050, 100, 73),
                                           (48000, 4800, 1600), (16000, 777, 777)])
def test_resampled_length(tmp_path, sr, n, expected):
    # ceil(n * up / down) with gcd-reduced up/down: 1000*160/441 = 362.8 -> 363; 100*320/441 = 72.6 -> 73
    assert num_frames_16k(n, sr) == expected
    write(tmp_path / "r.wav", sine(sr, n, freq=300.0), sr, subtype="FLOAT")
    assert len(load_audio("r.wav", str(tmp_path))) == expected == audio_num_frames("r.wav", str(tmp_path))


def test_8k_upsampling_keeps_the_tone(tmp_path):
    write(tmp_path / "n.wav", sine(8000, 4000, freq=300.0), 8000, subtype="FLOAT")
    y = load_audio("n.wav", str(tmp_path))
    assert np.abs(y - sine(SAMPLE_RATE, 8000, freq=300.0))[200:-200].max() < 2e-3


def test_resample_to_16k_arrays():
    stereo = np.stack([np.full(100, 0.2), np.full(100, 0.4)], 1)  # (T, C)
    np.testing.assert_allclose(resample_to_16k(stereo, SAMPLE_RATE), np.full(100, 0.3), rtol=1e-6)
    assert len(resample_to_16k(np.zeros(4410), 44100)) == 1600


def test_zip_slice_equals_direct_file(tmp_path):
    write(tmp_path / "a.wav", sine(SAMPLE_RATE, 3000), SAMPLE_RATE, subtype="PCM_16")
    write(tmp_path / "b.flac", sine(8000, 2000, freq=200.0), 8000)
    zpath = str(tmp_path / "clips.zip")
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as z:
        z.write(tmp_path / "a.wav", "a.wav")
        z.write(tmp_path / "b.flac", "sub/b.flac")
    root = str(tmp_path)
    for member, direct in (("a.wav", "a.wav"), ("sub/b.flac", "b.flac")):
        spec = zip_member_spec(zpath, member)
        np.testing.assert_array_equal(load_audio(spec, root), load_audio(direct, root))
        assert audio_num_frames(spec, root) == len(load_audio(direct, root))
    name, offset, length = zip_member_spec(zpath, "a.wav").split(":")
    assert reason_of(load_audio, f"{name}:{int(offset) + 7}:{length}", root).reason == "corrupt"  # misaligned
    err = reason_of(load_audio, f"{name}:{offset}:{10 ** 9}", root)
    assert err.reason == "corrupt" and "ends at byte" in str(err)
    assert reason_of(load_audio, f"{name}:{offset}:0", root).reason == "empty"
    assert reason_of(load_audio, "clips.zip", root).reason == "unsupported"  # zip without offset:length


# ------------------------------------------------------------------------------------------ errors
def test_error_reasons_and_messages(tmp_path, caplog):
    root = str(tmp_path)
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "random.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "song.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))  # MP4 container magic
    (tmp_path / "noext.bin").write_bytes(b"\x00\x00\x00\x20ftypisom" + bytes(200))
    write(tmp_path / "zero.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    write(tmp_path / "hush.wav", np.full(1600, SILENCE_PEAK / 2, np.float32), SAMPLE_RATE, subtype="FLOAT")
    write(tmp_path / "quiet.wav", np.full(1600, SILENCE_PEAK * 2, np.float32), SAMPLE_RATE, subtype="FLOAT")
    write(tmp_path / "long.wav", sine(SAMPLE_RATE, 3 * SAMPLE_RATE), SAMPLE_RATE)
    cases = {"missing.wav": "missing", "empty.wav": "empty", "random.wav": "corrupt", "song.m4a": "unsupported",
             "noext.bin": "unsupported", "zero.wav": "zero_length"}
    for name, reason in cases.items():
        err = reason_of(load_audio, name, root, where=("data/train_asr.tsv", 7))
        assert err.reason == reason, (name, str(err))
        assert str(err).startswith("data/train_asr.tsv:7: audio ") and os.path.join(root, name) in str(err)
        assert (err.file, err.row) == ("data/train_asr.tsv", 7)
    assert len(load_audio("quiet.wav", root)) == 1600  # just above the silence threshold
    # silence is valid audio ("Is anyone speaking?"): returned, with a warning naming file and row
    with caplog.at_level(logging.WARNING):
        assert len(load_audio("hush.wav", root, where=("data/train_asr.tsv", 7))) == 1600
    assert "data/train_asr.tsv:7: audio" in caplog.text and "hush.wav is silent" in caplog.text
    err = reason_of(load_audio, "long.wav", root, max_seconds=2.5)
    assert err.reason == "too_long" and "3.00 s" in str(err) and "2.5 s" in str(err)
    assert reason_of(audio_num_frames, "long.wav", root, max_seconds=2.5).reason == "too_long"
    assert len(load_audio("long.wav", root, max_seconds=3.0)) == 3 * SAMPLE_RATE
    err = reason_of(load_audio, "missing.wav", root)  # no manifest location: the message starts with the audio
    assert str(err).startswith("audio " + os.path.join(root, "missing.wav"))


def test_truncated_files_are_corrupt(tmp_path):
    root = str(tmp_path)
    data = open(write(tmp_path / "full.wav", sine(SAMPLE_RATE, 8000), SAMPLE_RATE, subtype="PCM_16"), "rb").read()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])  # header still promises 8000 samples
    for fn in (load_audio, audio_num_frames):
        err = reason_of(fn, "cut.wav", root)
        assert err.reason == "corrupt" and "truncated" in str(err) and "16000 bytes" in str(err)
    (tmp_path / "head.wav").write_bytes(data[:30])
    assert reason_of(load_audio, "head.wav", root).reason == "corrupt"
    # a streamed WAV (data size 0xFFFFFFFF placeholder) is not truncated
    streamed = data[:40] + struct.pack("<I", 0xFFFFFFFF) + data[44:]
    (tmp_path / "stream.wav").write_bytes(streamed)
    assert len(load_audio("stream.wav", root)) == 8000 == audio_num_frames("stream.wav", root)
    flac = open(write(tmp_path / "f.flac", sine(SAMPLE_RATE, 16000), SAMPLE_RATE), "rb").read()
    (tmp_path / "cut.flac").write_bytes(flac[: len(flac) // 2])
    assert reason_of(load_audio, "cut.flac", root).reason == "corrupt"  # found when decoding



# ------------------------------------------------------------------------------------------ segments, features
def test_segment_reads_the_file_s_own_samples_then_resamples(tmp_path):
    root = str(tmp_path)
    x16 = sine(SAMPLE_RATE, 16000, freq=300) * np.linspace(0.2, 1.0, 16000, dtype=np.float32)
    write(tmp_path / "a.wav", x16, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio("a.wav", root, segment=(4000, 9000)), x16[4000:9000])
    assert audio_num_frames("a.wav", root, segment=(4000, 9000)) == 5000
    x8 = sine(8000, 8000, freq=300)
    write(tmp_path / "b.flac", x8, 8000)  # start_frame / end_frame count the file's own (8 kHz) samples
    seg = load_audio("b.flac", root, segment=(1000, 3000))
    np.testing.assert_allclose(seg, resample_to_16k(sf.read(str(tmp_path / "b.flac"), dtype="float32")[0][1000:3000],
                                                    8000), atol=1e-6)
    assert len(seg) == audio_num_frames("b.flac", root, segment=(1000, 3000)) == 4000
    with zipfile.ZipFile(tmp_path / "c.zip", "w", compression=zipfile.ZIP_STORED) as z:
        z.write(tmp_path / "a.wav", "a.wav")
    np.testing.assert_array_equal(load_audio(zip_member_spec(str(tmp_path / "c.zip"), "a.wav"), root,
                                             segment=(100, 600)), x16[100:600])
    err = reason_of(load_audio, "a.wav", root, segment=(15000, 17000), where=("data/SQA.tsv", 3))
    assert err.reason == "segment" and str(err).startswith("data/SQA.tsv:3: audio ")
    assert "[15000, 17000)" in str(err) and "16000 samples" in str(err)
    assert reason_of(audio_num_frames, "a.wav", root, segment=(0, 16001)).reason == "segment"
    err = reason_of(load_audio, "a.wav", root, segment=(0, 16000), max_seconds=0.5)
    assert err.reason == "too_long"


def test_feature_files_say_the_model_needs_waveforms(tmp_path):
    root = str(tmp_path)
    np.save(tmp_path / "fbank.npy", np.zeros((100, 80), np.float32))  # what fairseq's S2T prep writes by default
    with zipfile.ZipFile(tmp_path / "fbank80.zip", "w", compression=zipfile.ZIP_STORED) as z:
        z.write(tmp_path / "fbank.npy", "utt1.npy")
    (tmp_path / "renamed.wav").write_bytes((tmp_path / "fbank.npy").read_bytes())
    for spec in ("fbank.npy", zip_member_spec(str(tmp_path / "fbank80.zip"), "utt1.npy"), "renamed.wav"):
        err = reason_of(load_audio, spec, root, where=("train.tsv", 2))
        assert err.reason == "unsupported", spec
        assert "features, not a waveform" in str(err) and "WavLLM reads 16 kHz audio" in str(err)
        assert "--use-audio-input" in str(err) and str(err).startswith("train.tsv:2: audio ")
