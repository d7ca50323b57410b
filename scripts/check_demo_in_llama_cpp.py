"""The trained demo model, exported to GGUF, runs in llama.cpp with our greedy text (CI runs it after `make demo`).

    python scripts/check_demo_in_llama_cpp.py [RUN_MODEL_DIR]      # default runs/demo-cpu/model

Converts the model with `tnl convert to-gguf --outtype f32`, then compares llama.cpp's logits over a
held-out passage (prefill) and its greedy continuation with ours. Prints the numbers; exits 1 when they
disagree, 0 when they agree, and 0 with a note when llama-cpp-python is not installed.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import tnl_model  # noqa: F401 - registers the Auto classes
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPT = "HAMLET. To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
NEW_TOKENS = 40
MAX_LOGIT_DIFF = 1e-3  # f32 weights, f32 K/V cache: only the kernels' summation order differs


def main(argv: list[str]) -> int:
    model_dir = Path(argv[0] if argv else "runs/demo-cpu/model")
    try:
        from llama_cpp import Llama
    except ImportError:
        print("note: llama-cpp-python is not installed (pip install -e '.[gguf]'); llama.cpp check skipped")
        return 0
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).logits[0].double().numpy()
        greedy = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                                pad_token_id=model.config.pad_token_id or 0)[0, len(ids):].tolist()
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "demo.gguf"
        subprocess.run([sys.executable, "-m", "tnl_model.convert", "to-gguf", str(model_dir), str(gguf),
                        "--outtype", "f32"], check=True)
        llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=64, n_ubatch=64, logits_all=True, type_k=0, type_v=0,
                    verbose=False)
        llm.reset()
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
        state = list(ids)
        for _ in range(NEW_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            state.append(nxt)
            llm.eval([nxt])
        their_greedy = state[len(ids):]
    diff = float(np.abs(theirs - ours).max())
    agree = float((theirs.argmax(-1) == ours.argmax(-1)).mean())
    same = next((i for i, (a, b) in enumerate(zip(their_greedy, greedy)) if a != b), NEW_TOKENS)
    print(f"demo model in llama.cpp (f32 GGUF): prompt of {len(ids)} tokens, max |logit diff| {diff:.2e}, argmax "
          f"agreement {agree:.3f}; greedy: {same} of {NEW_TOKENS} tokens identical")
    print("ours:      " + repr(tokenizer.decode(greedy)))
    print("llama.cpp: " + repr(tokenizer.decode(their_greedy)))
    return 0 if diff < MAX_LOGIT_DIFF and same == NEW_TOKENS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
