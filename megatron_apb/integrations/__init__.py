"""Thin layers over the core for other stacks: ``hf`` (transformers models),
``deepspeed`` (DeepSpeed's inference engine), ``megatron_lm`` (Megatron-LM's launchers).
Nothing in the core imports from here."""
