"""README claims QA: what the README promises about trees on the CPU holds, and the refusals name the fix."""
import pytest

from amphista_engine.engine import Engine
from amphista_engine.errors import ConfigError
from amphista_engine.heads import random_heads


def test_4bit_cpu_refuses_big_trees_and_names_float_weights_as_the_fix(tiny_hf_dir):
    """README: with 4-bit weights (the CPU default) trees are limited to 64 nodes and 7 levels, as in bf16; float
    weights in fp32 (--quant none) take any tree. The refusal used to say only "fp32 takes any tree", to a user
    already in fp32 (4-bit layers, fp32 between them)."""
    engine = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256, quant="q4")
    engine.load_heads(random_heads("amphista", engine.model, num_heads=4))
    with pytest.raises(ConfigError, match=r"4-bit.*at most 64 nodes.*quant='none'") as err:
        engine.generate("hello", max_new_tokens=2, speculative="amphista", tree="dynamic-80")
    assert "(fp32 takes any tree)" not in str(err.value)
    # float weights in fp32 take it
    flt = Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=256, quant="none")
    flt.load_heads(random_heads("amphista", flt.model, num_heads=4))
    res = flt.generate("hello", max_new_tokens=2, speculative="amphista", tree="dynamic-80")
    assert res.stats.extra["tree"] == "dynamic-80" and res.stats.extra["tree_nodes"] == 80
