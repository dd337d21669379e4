"""The Python API in a few lines: load a checkpoint, ask about a long document.

    python examples/python_api.py                                   # the embedded SmolLM2, one process
    python examples/python_api.py --model /models/Llama-3.1-8B-Instruct --document book.txt
    torchrun --nproc-per-node 4 examples/python_api.py --model DIR --tp 2   # TP 2 x CP 2

Under torchrun every process runs this same script; each gets the same answer, and only
rank 0 prints it.
"""

import argparse
import os

from megatron_apb import LongContextLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", help="HF directory, .gguf file or converted directory (default: SmolLM2)")
    parser.add_argument("--document", help="a text file (default: a short built-in one)")
    parser.add_argument("--question", default="What is the pass key?")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    if args.document:
        with open(args.document, encoding="utf-8") as f:
            document = f.read()
    else:
        document = "The grass is green. The sky is blue. " * 100 + "The pass key is 71432. " + "Here we go. " * 100

    lm = LongContextLM.from_pretrained(args.model, cp_mode="apb", tp=args.tp)
    out = lm.generate((document, args.question), max_new_tokens=args.max_new_tokens, stop=["\n\n"])
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"answer: {out.text!r}")
        print(f"{out.prompt_tokens} prompt tokens, prefill {out.prefill_s:.2f} s, "
              f"decode {out.decode_tokens_per_s:.1f} tokens/s")


if __name__ == "__main__":
    main()
