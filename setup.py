"""Packaging for tnl-model.

Each top-level source folder holds exactly one import package whose name is its folder
name (DESIGN.md section 1): ``tnl_model/``, ``kernels/tnl_kernels/``,
``training/tnl_training/``. ``kernels/`` and ``training/`` are plain folders, not
packages, so nothing at the repo root can shadow Hugging Face's ``kernels``
distribution (which transformers >= 5.25 requires) whatever directory Python starts in.
Subpackages are discovered, never listed by hand, so a new folder can't silently fall
out of the wheel.
"""

from setuptools import find_packages, setup

# import package -> the folder that holds it
SOURCE_ROOTS = {"tnl_model": ".", "tnl_kernels": "kernels", "tnl_training": "training"}


def discover_packages():
    """Every package and subpackage under the three source roots, with its folder mapping."""
    packages, package_dir = [], {}
    for name, root in SOURCE_ROOTS.items():
        for found in find_packages(where=root, include=[name, f"{name}.*"]):
            packages.append(found)
            package_dir[found] = f"{root}/{found.replace('.', '/')}".removeprefix("./")
    return packages, package_dir


packages, package_dir = discover_packages()

setup(
    name="tnl-model",
    version="0.1.0",
    description="Hybrid lightning-attention Mixture-of-Experts language models (TransNormer / MiniMax-Text-01 family) "
    "for Hugging Face transformers, with Triton kernels and DeepSpeed ZeRO pretraining",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    include_package_data=True,
    # Ranges: lower bounds are the oldest releases this suite has passed on; upper bounds
    # only where a known break exists (transformers 6 is a new major API).
    install_requires=[
        # torch is declared loosely so that an existing install (CPU or CUDA) is kept.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=5.24,<6",
        "safetensors>=0.4",
        "sentencepiece>=0.2",
        "tokenizers>=0.21",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.24",
    ],
    extras_require={
        "train": ["deepspeed>=0.16,<1", "matplotlib>=3.7", "tensorboard>=2.14"],
        "gpu": ["flash-attn>=2.6"],
        # `tnl convert to-gguf`, and llama.cpp to test it (an sdist: builds llama.cpp from source)
        "gguf": ["gguf>=0.19", "llama-cpp-python>=0.3.36"],
        "test": ["pytest>=8", "hypothesis>=6.100", "matplotlib>=3.7", "accelerate>=1.0", "peft>=0.13",
                 "lm-eval>=0.4.13", "parameterized>=0.9", "gguf>=0.19"],
    },
    entry_points={"console_scripts": ["tnl=tnl_model.cli:main", "tnl-pretrain=tnl_training.pretrain:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
