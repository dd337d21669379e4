"""Worker for tests/test_lm_api.py: the Python API under several processes (gloo)."""

from __future__ import annotations

import warnings

from tests.distributed import error_message


def stream_then_generate(rank, world, tp, stream_path, api_path, prompt, new_tokens):
    """One spawn, two checks: the instrumented streaming load of ``stream_path``
    (:func:`tests.checkpoint_workers.check_streaming_load`), then the API on ``api_path``
    at TP ``tp`` x CP ``world / tp`` (:func:`api_generate`)."""
    from tests.checkpoint_workers import check_streaming_load

    return {"stream": check_streaming_load(rank, world, tp, stream_path),
            "api": api_generate(rank, world, api_path, prompt, new_tokens, tp=tp)}


def api_generate(rank, world, path, prompt, new_tokens, tp=1):
    """``LongContextLM`` at TP ``tp`` x CP ``world / tp`` (exact mode, fp32): greedy ids of ``prompt``;
    the same ended by a stop string taken from them and by an EOS id among them; the
    refusal of a too-long request."""
    warnings.filterwarnings("ignore")
    from megatron_apb import LongContextLM

    lm = LongContextLM.from_pretrained(path, cp_mode="exact", tp=tp, dtype="fp32")
    greedy = lm.generate(prompt, max_new_tokens=new_tokens)
    out = {"ids": greedy.ids, "text": greedy.text, "eos_ids": lm.eos_ids, "prompt_tokens": greedy.prompt_tokens,
           "timings": [greedy.prefill_s, greedy.time_to_first_token_s]}
    # a stop string: the decoded text of the 3rd..4th generated tokens
    stop = lm.tokenizer.decode(greedy.ids[2:4], skip_special_tokens=True).strip()
    out["stop"] = stop
    stopped = lm.generate(prompt, max_new_tokens=new_tokens, stop=[stop])
    out["stopped_ids"], out["stopped_text"] = stopped.ids, stopped.text
    # an EOS id (as a generation_config.json list gives them): the 3rd token ends it
    lm.eos_ids = [10**9, greedy.ids[2]]
    out["eos_ids_run"] = lm.generate(prompt, max_new_tokens=new_tokens).ids
    # a list of prompts gives a list
    out["batch"] = [g.ids for g in lm.generate([prompt, prompt], max_new_tokens=2)]
    out["too_long"] = error_message(lambda: lm.generate(prompt, max_new_tokens=lm.spec.max_position_embeddings))
    return out
