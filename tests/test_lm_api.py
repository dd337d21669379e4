"""What ends generation, in process (the API on several processes: tests/test_stream_load.py).

* EOS ids from generation_config.json and config.json (lists too),
  mixture-of-experts configs refused naming the field, the positions message, top-k.
"""

import json

import pytest
import torch

pytest.importorskip("transformers")

from megatron_apb.checkpoints import ModelSpec, UnsupportedModelError, eos_token_ids  # noqa: E402
from tests.test_stream_load import SHAPES  # noqa: E402

def test_eos_ids_from_generation_config_lists(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 128001}))

    class Tok:
        eos_token_id = 7

    assert eos_token_ids(tmp_path, Tok()) == [128001, 128009, 7]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": "x"}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id 'x'"):
        eos_token_ids(tmp_path)


@pytest.mark.parametrize("field", ["num_experts", "num_local_experts"])
def test_moe_config_refused_naming_the_field(field):
    config = {**SHAPES["tiny-qwen2"], field: 8}
    with pytest.raises(UnsupportedModelError, match=f"{field}=8: mixture-of-experts"):
        ModelSpec.from_hf_config(config)


def test_top_k_keeps_the_k_most_likely():
    from megatron_apb.inference.sampling import SamplingConfig, sample

    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 4.8])
    cfg = SamplingConfig(temperature=100.0, top_k=2, seed=0)
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, cfg, g) for _ in range(200)}
    assert drawn == {1, 2}
