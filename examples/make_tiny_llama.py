"""Write a tiny random Llama (with a small tokenizer) for the CPU form of the examples.

    python examples/make_tiny_llama.py --out /tmp/tiny-llama

The directory is a normal Hugging Face checkpoint (``config.json``, ``model.safetensors``,
``tokenizer.json``): ``megatron-apb generate --model DIR`` and ``AutoModelForCausalLM``
both load it.  The weights are random, so its answers are noise; it exists to run the
launch scripts end to end in seconds.  8 query heads and 2 KV heads allow TP = 2.
The tokenizer is a byte-level BPE trained here, offline, on the pass-key filler text.
"""

from __future__ import annotations

import argparse
import os


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.",
        "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.",
        "What is the pass key? Answer with the number only.",
        "The pass key is 12345. Remember it. 0123456789",
        "Question: Answer: I will quiz you about the important information there.",
    ] * 4
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(out: str, *, layers: int, hidden: int, seed: int, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        head_dim=hidden // 8, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # larger than HF's 0.02 init so that layers do something
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.1)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab-size", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "config.json")):
        print(f"tiny model already at {args.out}")
        return 0
    make_model(args.out, layers=args.layers, hidden=args.hidden, seed=args.seed, vocab_size=args.vocab_size)
    print(f"wrote a tiny random Llama to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
