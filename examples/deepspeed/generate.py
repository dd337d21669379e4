"""Long-context generation through DeepSpeed inference with APB context parallelism.

Run under torchrun (see generate.sh); world size = tensor_parallel.tp_size x apb.cp_size.

    torchrun --nproc-per-node 4 examples/deepspeed/generate.py \
        --model /models/Llama-3.1-8B-Instruct --ds-config examples/deepspeed/ds_config_apb.json

A Hugging Face Llama-family checkpoint (``llama``, ``qwen2``, ``mistral``) is loaded with
transformers, its attention replaced by APB attention and its layers sharded by DeepSpeed's
AutoTP (``megatron_apb.integrations.deepspeed.init_inference``).  Without ``--document-file``
the prompt is the built-in pass-key retrieval task of ``--haystack-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DeepSpeed inference with APB context parallelism")
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--ds-config", required=True, help="DeepSpeed inference config (JSON) with an \"apb\" section")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="override the config's dtype (fp32 for CPU runs)")
    p.add_argument("--heads", help="override the \"apb\" section's retaining-head checkpoint")
    p.add_argument("--document-file", help="text file with the document")
    p.add_argument("--question", help="the question (required with --document-file)")
    p.add_argument("--haystack-tokens", type=int, default=6000)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-json", help="write ids, answer and timings here (rank 0)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_apb.data import passkey_prompt, tokenize_prompt
    from megatron_apb.inference import SamplingConfig
    from megatron_apb.inference.launch import quiet_warnings
    from megatron_apb.integrations.deepspeed import init_inference

    quiet_warnings()
    with open(args.ds_config, encoding="utf-8") as f:
        config = json.load(f)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if args.dtype:
        config["dtype"] = args.dtype
    if args.heads:
        config.setdefault("apb", {})["heads"] = args.heads
    dtype = dtypes.get(str(config.get("dtype", "fp32")).replace("float32", "fp32").replace("bfloat16", "bf16"),
                       torch.float32)
    rank = int(os.environ.get("RANK", "0"))
    say = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    engine = init_inference(model, config, pad_id=tokenizer.pad_token_id or 0)
    tp = dist.get_world_size(engine.tp_group) if engine.tp_group is not None else 1
    say(f"DeepSpeed inference + APB: {dist.get_world_size()} processes, DeepSpeed TP={tp} x "
        f"APB CP={engine.cp_size}, mode={engine.apb_config.mode}, compressor={engine.apb_config.compressor}")

    expected = None
    if args.document_file:
        if not args.question:
            raise SystemExit("--document-file needs --question")
        with open(args.document_file, encoding="utf-8") as f:
            document, question = f.read(), args.question
    else:
        document, question, expected = passkey_prompt(tokenizer, args.haystack_tokens, seed=args.seed)
    prompt = tokenize_prompt(tokenizer, document, question)
    if "query_prefix_len" not in config.get("apb", {}):
        engine.engine.config = engine.apb_config.replace(query_prefix_len=prompt.header_len)
    say(f"prompt: {len(prompt.document_ids)} document tokens + {len(prompt.query_ids)} query tokens")
    stops = [t for t in (tokenizer.eos_token_id,) if t is not None]
    result = engine.generate(prompt.document_ids, prompt.query_ids,
                             SamplingConfig(max_new_tokens=args.max_new_tokens, stop_ids=stops, seed=args.seed))
    text = tokenizer.decode(result.output_ids, skip_special_tokens=True).strip()
    say(f"answer: {text!r}")
    say(f"prefill {result.prefill_s:.2f} s, time to first token {result.time_to_first_token_s:.2f} s, "
        f"decode {result.decode_tokens_per_s:.1f} tokens/s")
    if expected is not None:
        say(f"pass key {expected!r} {'found' if expected in text else 'NOT found'}")
    if args.output_json and rank == 0:
        with open(args.output_json, "w", encoding="utf-8") as f:
            json.dump(dict(model=args.model, tp=tp, cp=engine.cp_size, layout=result.layout,
                           output_ids=result.output_ids, text=text, expected_answer=expected,
                           document_ids=result.document_ids, query_ids=result.query_ids,
                           prefill_s=result.prefill_s), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
