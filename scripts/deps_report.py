"""Print the resolved versions of the packages this project is most sensitive to.

CI installs the newest releases the registry serves; when a run turns red after a registry
change, this one table says what moved. Run as ``make deps-report``.
"""

import platform
import sys
from importlib import metadata

WATCHED = ["torch", "triton", "transformers", "kernels", "huggingface-hub", "tokenizers", "safetensors", "deepspeed",
           "accelerate", "peft", "lm-eval", "gguf", "llama-cpp-python", "sentencepiece", "numpy", "setuptools", "pip"]


def main() -> None:
    print(f"python {platform.python_version()} ({sys.executable})")
    width = max(map(len, WATCHED))
    for name in WATCHED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        print(f"  {name:<{width}}  {version}")


if __name__ == "__main__":
    main()
