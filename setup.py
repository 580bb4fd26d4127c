"""megarlhf: RLHF for large language models on Megatron-Core.

torch is required as `torch>=2.4` and is not pinned here, so a GPU container keeps the
torch it ships. On a fresh machine `make` installs `torch==2.13.0` (CPU build from local
disk) before this package, so pip never pulls a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="megarlhf",
    version="0.1.0",
    description="RLHF (SFT, reward model, PPO, DPO, GRPO) on Megatron-Core, TP/PP/DP at every role",
    python_requires=">=3.10",
    packages=find_packages(include=["megarlhf", "megarlhf.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron.core.dist_checkpointing
        "einops",  # megatron.core.hyper_comm_grid
        "matplotlib",  # plots/*.png in run directories
        "xxhash",  # checkpoint checksums (checkpoint/verify.py)
    ],
    extras_require={
        # transformers: HF conversion is checked against it; tensorboard: run dirs write events when it is present
        "test": ["pytest>=8", "pytest-timeout", "transformers", "tensorboard"],
        # Transformer Engine fused kernels (GPU). Apex is optional too but is built from
        # source (NGC PyTorch containers ship both); megarlhf runs without either.
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megarlhf=megarlhf.cli:main"]},
)
