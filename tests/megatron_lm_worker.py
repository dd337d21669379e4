"""Megatron-LM's own entry-point code with the APB hooks, on CPU; run by tests/test_megatron_lm.py.

Launched with torchrun (env:// rendezvous, as Megatron-LM is launched), with a Megatron-LM
checkout on PYTHONPATH.  Usage::

    torchrun --nproc-per-node 1 tests/megatron_lm_worker.py spec OUT.json
    torchrun --nproc-per-node 2 tests/megatron_lm_worker.py server OUT.json   # patched server first on PYTHONPATH

Megatron-LM initialises on CPU as far as its code allows; the steps it only takes with a
GPU are done here by hand (see :func:`cpu_model_parallel`).  Rank 0 writes a JSON report.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

SPEC = ["--spec", "megatron_apb.integrations.megatron_lm", "gpt_layer_apb_spec"]
VOCAB = 128
# A small Llama-style model in Megatron-LM flags; CPU-friendly settings (no fusions, fp32).
MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--ffn-hidden-size", "128",
    "--seq-length", "64", "--max-position-embeddings", "256", "--micro-batch-size", "1",
    "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
    "--transformer-impl", "local", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
    "--rotary-base", "500000", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0", "--init-method-std", "0.2",
    "--distributed-backend", "gloo", "--use-cpu-initialization", "--no-persist-layer-norm",
    "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
    "--no-gradient-accumulation-fusion",
]


def parse_error(argv, extra_args_provider):
    """Megatron-LM's parse_args on ``argv``: (exit status, last line of stderr)."""
    from megatron.training.arguments import parse_args

    sys.argv, err = ["pretrain_gpt.py", *argv], io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parse_args(extra_args_provider)
        except SystemExit as exc:
            return exc.code, err.getvalue().strip().splitlines()[-1]
    return 0, ""  # accepted


def initialize(argv, extra_args_provider, args_defaults=None):
    """``initialize_megatron`` as the entry points call it, then :func:`cpu_model_parallel`."""
    from megatron.training import get_args
    from megatron.training.initialize import initialize_megatron

    sys.argv = ["pretrain_gpt.py", *argv]
    if torch.cuda.device_count() == 0:
        # validate_args asks the GPU's architecture (torch.cuda.get_device_properties) when
        # TP or CP > 1; answer as a Hopper GPU does, whose launches set this variable.
        import megatron.training.arguments as arguments

        arguments.get_device_arch_version = lambda: 9
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    # allow_no_cuda: the entry points assert torch.cuda.is_available() without it.
    # skip_mpu_initialization: finish_mpu_init() is run below, with the CPU steps added.
    initialize_megatron(extra_args_provider=extra_args_provider, args_defaults=args_defaults or {},
                        allow_no_cuda=True, skip_mpu_initialization=True)
    args = get_args()
    cpu_model_parallel(args)
    return args


def cpu_model_parallel(args):
    """Megatron-LM's ``finish_mpu_init`` on CPU.

    ``_initialize_distributed`` (Megatron-LM's own; gloo here) creates the model-parallel
    groups only when ``torch.cuda.device_count() > 0``, so ``initialize_model_parallel`` is
    called here with the parsed sizes; then Megatron-LM's ``_set_random_seed`` and
    megatron_apb's CPU shims (``torch.cuda.current_device`` -> CPU, Megatron's inference
    RNG tracker).
    """
    from megatron.core import mpu
    from megatron.training.initialize import _initialize_distributed, _set_random_seed

    from megatron_apb.megatron import init_cpu_megatron

    _initialize_distributed(None, None, None)
    mpu.initialize_model_parallel(
        args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    _set_random_seed(args.seed)
    init_cpu_megatron()


def build(builder):
    """What Megatron-LM's ``get_model(partial(model_provider, builder))`` builds, without
    its ``model_module.cuda(...)``."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from model_provider import model_provider

    pg = ProcessGroupCollection.use_mpu_process_groups()
    return model_provider(builder, pre_process=True, post_process=True, pg_collection=pg).eval()


def logits(model, tokens):
    n = tokens.shape[0]
    mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        return model(tokens[None], torch.arange(n)[None], mask)[0]


def spec_scenario():
    """World 1, the unpatched checkout: flags, the ``--spec`` import, a forward."""
    from megatron.core.transformer.spec_utils import import_module

    from megatron_apb.integrations import megatron_lm as hooks
    from megatron_apb.megatron import APBCoreAttention, APBSelfAttention

    report = {}
    for name, flags in {
        "star_with_passing": ["--apb-mode", "star", "--apb-passing-len", "8"],
        "negative_anchor": ["--apb-anchor-len", "-1"],
        "unknown_mode": ["--apb-mode", "ring"],
        "missing_heads": ["--apb-heads", "/no/such/heads.safetensors"],
    }.items():
        report[name] = parse_error(MODEL_FLAGS + SPEC + flags, hooks.add_apb_args)

    args = initialize(MODEL_FLAGS + SPEC + ["--apb-mode", "exact"], hooks.add_apb_args)
    from gpt_builders import gpt_builder

    report["args"] = dict(spec=args.spec, apb_mode=args.apb_mode, apb_query_tokens=args.apb_query_tokens)
    report["spec_is_hook"] = import_module(args.spec) is hooks.gpt_layer_apb_spec
    model = build(gpt_builder)  # Megatron-LM's gpt_builder, --spec -> our hook
    attention = model.decoder.layers[0].self_attention
    report["layer"] = type(model.decoder.layers[0]).__name__
    report["apb_layers"] = all(
        isinstance(layer.self_attention, APBSelfAttention)
        and isinstance(layer.self_attention.core_attention, APBCoreAttention)
        for layer in model.decoder.layers
    )
    report["mode"] = attention.core_attention.apb_config.mode
    report["norm"] = type(model.decoder.layers[0].input_layernorm).__name__
    report["linear_qkv"] = type(attention.linear_qkv).__name__

    tokens = torch.randint(1, VOCAB, (48,), generator=torch.Generator().manual_seed(3))
    got = logits(model, tokens)
    report["logits_shape"] = list(got.shape)
    report["finite"] = bool(torch.isfinite(got).all())
    report["logits_scale"] = float(got.abs().max())

    args.spec = None  # Megatron-LM's default layer spec (local), same weights
    plain = build(gpt_builder)
    report["plain_core_attention"] = type(plain.decoder.layers[0].self_attention.core_attention).__name__
    plain.load_state_dict(model.state_dict())
    report["err_vs_megatron_attention"] = float((got - logits(plain, tokens)).abs().max())

    own = build(hooks.apb_gpt_builder)  # the builder for scripts of one's own
    own.load_state_dict(model.state_dict())
    report["err_apb_gpt_builder"] = float((got - logits(own, tokens)).abs().max())
    return report


def server_scenario():
    """World 2 = CP 2, the patched copy of tools/run_text_generation_server.py first on
    PYTHONPATH: its argument provider, Megatron-LM's gpt_builder with --spec, its
    get_inference_engine, one request as run_mcore_engine makes it; against megatron_apb's
    own engine on the same weights."""
    import run_text_generation_server as server
    from megatron.core import mpu
    from megatron.core.inference.inference_request import InferenceRequest
    from megatron.core.inference.sampling_params import SamplingParams
    from megatron.training import get_tokenizer

    from megatron_apb import APBConfig
    from megatron_apb.inference import APBEngine, SamplingConfig
    from megatron_apb.integrations.megatron_lm import APBServerEngine
    from megatron_apb.megatron import build_gpt_model

    apb = ["--apb-mode", "apb", "--apb-anchor-len", "8", "--apb-passing-len", "4",
           "--apb-query-prefix-len", "2", "--apb-query-tokens", "4"]
    args = initialize(
        MODEL_FLAGS + SPEC + apb + ["--context-parallel-size", "2"], server.add_text_generate_args,
        {"no_load_rng": True, "no_load_optim": True, "exit_on_missing_checkpoint": True},
    )
    report = dict(
        server_file=server.__file__, builder_file=sys.modules[server.gpt_builder.__module__].__file__,
        cp=mpu.get_context_parallel_world_size(), cp_rank=mpu.get_context_parallel_rank(),
    )
    model = build(server.gpt_builder)
    # Megatron's GPTModel slices the rotary table for its zig-zag layout at CP > 1 ...
    report["rotary_sliced_after_build"] = model.rotary_pos_emb.cp_group is not None
    with torch.inference_mode():  # as the server's main()
        engine = server.get_inference_engine(args, model)
        report["engine"] = type(engine).__name__
        # ... and the patched get_inference_engine prepared the model for APB
        report["rotary_unsliced_after_engine"] = model.rotary_pos_emb.cp_group is None
        assert isinstance(engine, APBServerEngine)
        tokenizer = get_tokenizer()
        g = torch.Generator().manual_seed(8)
        prompt_tokens = torch.randint(1, VOCAB, (44,), generator=g).tolist()
        params = SamplingParams(temperature=1.0, top_k=1, top_p=0.0, return_segments=True,
                                num_tokens_to_generate=6, skip_prompt_log_probs=False)
        request = InferenceRequest(prompt=tokenizer.detokenize(prompt_tokens), prompt_tokens=prompt_tokens,
                                   sampling_params=params, request_id=engine.get_new_request_id())
        (result,) = engine.generate(inference_requests=[request])
        report["got"] = result.generated_tokens.tolist()
        report["text"] = result.generated_text

        config = APBConfig(mode="apb", anchor_len=8, passing_len=4, query_prefix_len=2)
        from megatron.core.process_groups_config import ProcessGroupCollection

        pg = ProcessGroupCollection.use_mpu_process_groups()
        ref = build_gpt_model(model.config, config, vocab_size=args.padded_vocab_size,
                              max_sequence_length=args.max_position_embeddings, pg_collection=pg,
                              rotary_base=args.rotary_base, share_embeddings_and_output_weights=False)
        ref.load_state_dict(model.state_dict())
        want = APBEngine(ref.eval(), config, cp_group=pg.cp, tp_group=pg.tp, vocab_size=tokenizer.vocab_size)
        report["want"] = want.generate(prompt_tokens[:-4], prompt_tokens[-4:], SamplingConfig(
            max_new_tokens=6, stop_ids=[tokenizer.eod])).output_ids
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, report)
    return {"ranks": gathered}


def load_scenario():
    """World 2 = TP 2, Megatron-LM's default (local) layer spec: ``--load`` of the
    distributed checkpoint ``convert --format torch_dist`` wrote (``LOAD_DIR``) through
    Megatron-LM's ``load_checkpoint``; the logits of ``LOAD_TOKENS`` (comma-separated),
    gathered over TP."""
    from megatron.core import mpu
    from megatron.training.checkpointing import load_checkpoint
    from gpt_builders import gpt_builder

    args = initialize(MODEL_FLAGS + [
        "--tensor-model-parallel-size", "2", "--load", os.environ["LOAD_DIR"], "--ckpt-format", "torch_dist",
        "--no-load-optim", "--no-load-rng", "--exit-on-missing-checkpoint",
    ], None)
    model = build(gpt_builder)
    make = torch.tensor
    if torch.cuda.device_count() == 0:  # read_metadata all-reduces the iteration from a tensor on 'cuda'
        torch.tensor = lambda *a, device=None, **k: make(*a, device="cpu" if device == "cuda" else device, **k)
    try:
        iteration, _ = load_checkpoint([model], None, None)
    finally:
        torch.tensor = make
    tokens = torch.tensor([int(t) for t in os.environ["LOAD_TOKENS"].split(",")])
    part = logits(model, tokens)  # this TP rank's vocabulary columns
    parts = [torch.empty_like(part) for _ in range(mpu.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, part, group=mpu.get_tensor_model_parallel_group())
    return {"iteration": iteration, "ckpt_format": args.ckpt_format, "logits": torch.cat(parts, -1).tolist()}


def main():
    scenario, out = sys.argv[1], sys.argv[2]
    report = {"spec": spec_scenario, "server": server_scenario, "load": load_scenario}[scenario]()
    if int(os.environ.get("RANK", "0")) == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
