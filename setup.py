"""megatron_apb: APB long-context prefill for Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron_apb",
    version="0.1.0",
    description=(
        "APB: distributed long-context prefill by passing compressed context blocks, "
        "as a Megatron-Core context-parallel attention"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_apb", "megatron_apb.*"]),
    package_data={"megatron_apb.ops.sparse": ["plans/*.json"]},
    install_requires=[
        "torch>=2.5",
        "megatron-core>=0.16.1,<0.20",
        "numpy",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout"],
        "hf": ["transformers>=4.45", "gguf", "accelerate", "sentencepiece", "tokenizers"],
        "deepspeed": ["deepspeed>=0.19,<0.20"],
        "eval": ["wonderwords>=2.2", "nupunkt>=0.5"],  # task material (essays: `model`)  # tested: 0.19.8 (CPU, gloo)
    },
    entry_points={"console_scripts": ["megatron-apb=megatron_apb.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
