"""Every shipped yaml composes through the real fairseq-hydra-train CLI and carries the paper's settings."""
import glob
import os
import subprocess

import pytest
import yaml

from wavllm_fairseq.errors import WavLLMInputError
from wavllm_fairseq.models.wavllm import WavLLMModel
from wavllm_fairseq.tasks.instruction import parse_task_lengths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the training configs: the paper's in examples/, the toy's and small_real's as package data of the toy
# (decode.yaml and decode_reference.yaml hold fairseq-generate's settings: tests/tools/test_decode_args.py)
CONFIGS = sorted(p for folder in (os.path.join(ROOT, "examples", "wavllm", "config"),
                                  os.path.join(ROOT, "wavllm_fairseq", "toy", "config"))
                 for p in glob.glob(os.path.join(folder, "**", "*.yaml"), recursive=True)
                 if os.path.basename(p) not in ("decode.yaml", "decode_reference.yaml"))
OVERRIDES = ["task.data=/data", "model.whisper_path=/w", "model.wavlm_path=/l", "model.llama_path=/ll",
             "checkpoint.save_dir=/ckpt"]


def compose(path):
    """The job config fairseq-hydra-train would run (hydra's --cfg job, resolved), as a dict."""
    cfg_dir, name = os.path.dirname(path), os.path.basename(path)[:-5]
    extra = ["checkpoint.finetune_from_model=/s1.pt"] if "stage2" in name else []
    out = subprocess.run(["fairseq-hydra-train", "--config-dir", cfg_dir, "--config-name", name, "--cfg", "job",
                          "--resolve", *OVERRIDES, *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout[out.stdout.index("common:"):]
    return yaml.safe_load(text)


def test_all_configs_found():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"wavllm_stage1.yaml", "wavllm_stage2.yaml", "toy_stage1.yaml", "toy_stage2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.basename(p) for p in CONFIGS])
def test_config_composes_and_starts_with_its_command(path):
    first_lines = open(path).read().splitlines()[:12]
    assert any("fairseq-hydra-train" in line for line in first_lines), "the yaml must start with its launch command"
    cfg = compose(path)
    assert cfg["task"]["_name"] == "wavllm_instruction"
    align = path.endswith("_align.yaml")  # stage 1a: CTC alignment of the speech span, before stage 1
    assert cfg["criterion"]["_name"] == ("wavllm_ctc_align" if align else "wavllm_cross_entropy")
    assert cfg["dataset"]["required_batch_size_multiple"] == 1  # fairseq would drop a last partial batch
    assert cfg["common"]["user_dir"].endswith("wavllm_fairseq")
    assert cfg["optimizer"]["adam_betas"] == "(0.9,0.98)"
    # 10% linear warm-up
    assert cfg["lr_scheduler"]["warmup_updates"] * 10 == cfg["optimization"]["max_update"]
    stage2 = "stage2" in path
    assert cfg["model"]["prompt_adapter"] is stage2
    if stage2:
        assert cfg["checkpoint"]["finetune_from_model"] == "/s1.pt"
        assert any(m in cfg["task"]["train_manifests"] for m in ("train_mt", "train_multi"))


@pytest.mark.parametrize("name,updates", [("wavllm_stage1", 400000), ("wavllm_stage2", 150000)])
def test_paper_settings(name, updates):
    cfg = compose(os.path.join(ROOT, "examples", "wavllm", "config", name + ".yaml"))
    assert cfg["optimization"]["max_update"] == updates
    assert cfg["optimization"]["lr"] == [1e-4]
    assert cfg["dataset"]["max_tokens"] == 30 * 16000  # 30 s of audio per GPU
    assert cfg["distributed_training"]["distributed_world_size"] == 32
    assert cfg["model"]["_name"] == "wavllm_7b"


@pytest.mark.parametrize("override, field", [("model.backbone_dtype=bfloat61", "backbone_dtype"),
                                             ("model.lora_scale_layout=metta", "lora_scale_layout"),
                                             ("task.chat_template=tokeniser", "chat_template")])
def test_a_typo_in_a_choice_fails_when_the_config_is_composed(override, field):
    path = os.path.join(ROOT, "wavllm_fairseq", "toy", "config", "toy", "toy_stage1.yaml")
    out = subprocess.run(["fairseq-hydra-train", "--config-dir", os.path.dirname(path), "--config-name", "toy_stage1",
                          "--cfg", "job", *OVERRIDES, override], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode != 0 and field in out.stderr, out.stderr[-2000:]


def test_a_typo_in_a_python_config_is_a_named_error():
    with pytest.raises(WavLLMInputError, match="bottleneck_norm must be one of post, pre"):
        WavLLMModel.from_arch("wavllm_tiny", vocab_size=100, bottleneck_norm="mid")


def test_max_len_per_task_is_parsed_with_a_clear_error():
    assert parse_task_lengths("sv:20, er:20,asr:120") == {"sv": 20, "er": 20, "asr": 120}
    assert parse_task_lengths("") == {}
    for bad in ("sv=20", "sv:", ":20", "sv:0", "sv:many"):
        with pytest.raises(WavLLMInputError, match="max_len_per_task"):
            parse_task_lengths(bad)
