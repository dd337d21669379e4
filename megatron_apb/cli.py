"""The ``megatron-apb`` command line."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    """Versions and the attention backends available on this machine."""
    import torch

    import megatron_apb

    print(f"megatron_apb {megatron_apb.__version__}")
    print(f"torch {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    try:
        import megatron.core

        print(f"megatron-core {megatron.core.__version__}")
    except ImportError:
        print("megatron-core: not installed")
    for name in ("flash_attn", "transformer_engine", "triton", "transformers", "deepspeed"):
        try:
            module = __import__(name)
            print(f"{name} {getattr(module, '__version__', '?')}")
        except Exception:
            print(f"{name}: not installed (optional)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-apb",
        description="APB long-context prefill for Megatron-Core models.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions and optional accelerators present")
    info.set_defaults(func=_cmd_info)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
