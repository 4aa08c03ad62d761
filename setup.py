"""megatron-eaopd: Entropy-Aware On-Policy Distillation for Megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron-eaopd",
    version="0.1.0",
    description="Entropy-Aware On-Policy Distillation (EOPD) for Megatron-core with TP and PP",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["megatron_eaopd", "megatron_eaopd.*"]),
    python_requires=">=3.10",
    install_requires=[
        # torch is not pinned here so GPU clusters keep their own CUDA build; the README pins the
        # CPU wheel (torch==2.13.0) for developer machines and CI.
        "torch>=2.4",
        # 0.16.1 is the newest release for Python 3.11; megatron-core needs tqdm and psutil at run
        # time without declaring them (psutil: the dist_checkpointing writer hangs without it).
        "megatron-core>=0.16.1,<0.18",
        "tqdm",
        "psutil",
        "numpy",
        "pyyaml",
        "sentencepiece",
        # Hugging Face weights in and out (models.hf); transformers itself stays optional
        "safetensors",
    ],
    extras_require={
        # GPU-only parts: Transformer Engine layer specs and fused kernels. They do not import
        # without CUDA; the code falls back to megatron-core's local specs and torch ops.
        "gpu": ["transformer-engine[pytorch]"],
        "logging": ["tensorboard", "wandb"],
        "math": ["math-verify"],
        "plot": ["matplotlib"],
        "parquet": ["pyarrow"],
        "hf": ["transformers"],
        "test": [
            "pytest>=8",
            "ruff>=0.5",
            "tensorboard",
            "transformers",
            "tokenizers",
            "safetensors",
        ],
        "dev": ["pytest>=8", "ruff>=0.5", "pre-commit"],
    },
    entry_points={
        "console_scripts": [
            "eaopd-train=megatron_eaopd.cli:main",
            "eaopd-loss-demo=megatron_eaopd.demo:main",
            "eaopd-convert=megatron_eaopd.convert:main",
            "eaopd-plan=megatron_eaopd.plan.cli:main",
        ],
    },
)
