"""User QA of the lean CPU loaders (load_model(..., quant), layer-by-layer 4-bit loading): what a user passing quant
directly, or timing a file with `amphista bench`, meets."""
import pytest

from amphista_engine.errors import AmphistaError, ConfigError
from amphista_engine.kernels import cpu_quant
from amphista_engine.loading import load_model
from conftest import write_tiny_gguf

pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def q4_gguf(tiny_hf_dir, tmp_path_factory):
    return write_tiny_gguf(tiny_hf_dir, tmp_path_factory.mktemp("lean_qa") / "q40.gguf", qtype="Q4_0")


def _on_codes(model) -> bool:
    return any(cpu_quant.on_codes(m) for m in model.layers.modules())


def test_load_model_quant_is_checked_as_the_engine_checks_it(q4_gguf, tiny_hf_dir):
    """quant=None meant "none" to the Engine (LinearSetup) but "quantize" to the GGUF loader, and a typo ("q8",
    "Q4") made a 4-bit model silently (a Hugging Face folder ignored it): now None is floats and an unknown scheme
    is refused by name, for both kinds of checkpoint."""
    assert not _on_codes(load_model(q4_gguf, max_seq_len=64, quant=None).model)
    for path in (q4_gguf, tiny_hf_dir):
        for bad in ("q8", "Q4"):
            with pytest.raises(ConfigError, match=f"unknown quant '{bad}'") as e:
                load_model(path, max_seq_len=64, quant=bad)
            assert isinstance(e.value, AmphistaError)
    assert _on_codes(load_model(q4_gguf, max_seq_len=64, quant="auto").model)


def test_bench_times_a_mixed_file_as_the_engine_runs_it(tiny_hf_dir, tmp_path):
    """`amphista bench` loaded floats and then quantized them ("auto": only if every layer requantizes exactly), so
    a Q4_K_M-like file (Q4_0 layers, wider attn_v / ffn_down) was timed as an fp32 model, while the Engine runs
    it on codes and int8 rows. The bench now loads with the same quant as the Engine."""
    from amphista_engine.engine import Engine
    from amphista_engine.evaluation.bench import run_bench
    wide = {f"blk.{i}.{n}.weight": t for i in range(2) for n, t in (("attn_v", "Q5_0"), ("ffn_down", "Q5_1"))}
    path = write_tiny_gguf(tiny_hf_dir, tmp_path / "mixed.gguf", qtype="Q4_0", qtypes=wide)
    engine = Engine.from_pretrained(str(path), device="cpu", dtype="fp32", max_seq_len=64)
    if engine.quant != "q4":
        pytest.skip("'auto' does not run 4-bit on this CPU")
    r = run_bench(str(path), device="cpu", dtype="fp32", trees=["chain-2"], prompt_tokens=16, repeats=1, warmup=1,
                  num_heads=2, methods=("amphista",), out=str(tmp_path / "bench"), log=lambda *a: None)
    assert r["meta"]["linears"] == engine.linears.describe()
    assert r["meta"]["linears"].startswith("4-bit layers")
