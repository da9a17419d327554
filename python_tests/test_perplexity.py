"""`amphista perplexity` / evaluation.perplexity: llama.cpp's chunked perplexity, checked against transformers' logits
on the same chunks; bad input named."""
import json
import math
from pathlib import Path

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.errors import InputError
from amphista_engine.evaluation.perplexity import perplexity
from conftest import CORPUS, needs_smollm2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    return Engine.from_pretrained(str(tiny_hf_dir), device="cpu", dtype="fp32", max_seq_len=128)


def test_matches_transformers_on_the_same_chunks(engine, tiny_hf_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    ctx = 64
    got = perplexity(engine, CORPUS, ctx=ctx, max_chunks=3)
    ids = engine.tokenizer.encode(CORPUS)
    nll = []
    for c in range(3):
        chunk = ids[c * ctx:(c + 1) * ctx]
        if engine.tokenizer.add_bos:
            chunk = [engine.tokenizer.bos_id] + chunk[1:]
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([chunk])).logits[0].double(), -1)
        nll += [-logp[j, chunk[j + 1]].item() for j in range(ctx // 2, ctx - 1)]
    want = math.exp(sum(nll) / len(nll))
    assert got.tokens == len(nll) == 3 * (ctx // 2 - 1) and got.chunks == 3 and got.ctx == ctx
    assert abs(got.ppl - want) / want < 1e-5
    assert 0 < got.ppl_stderr < got.ppl
    # every chunk by default; the per-chunk callback sees a running value
    seen = []
    full = perplexity(engine, CORPUS, ctx=ctx, progress=lambda c, n, p: seen.append((c, n, p)))
    assert full.chunks == len(ids) // ctx == len(seen) and seen[-1][2] == pytest.approx(full.ppl)


@pytest.mark.parametrize("kwargs,match", [
    ({"text": ""}, "non-empty text"),
    ({"text": "short"}, r"the text is \d+ tokens, shorter than one chunk of ctx=64"),
    ({"ctx": 3}, r"ctx \(the chunk length\) must be an integer from 4 to the engine's max_seq_len \(128\), got 3"),
    ({"ctx": 129}, "got 129"),
    ({"ctx": 64.5}, "got 64.5"),
    ({"max_chunks": 0}, "max_chunks must be a positive integer, got 0"),
])
def test_bad_input_is_named(engine, kwargs, match):
    args = {"text": CORPUS, "ctx": 64, **kwargs}
    with pytest.raises(InputError, match=match):
        perplexity(engine, args.pop("text"), **args)


def test_cli(tiny_hf_dir, engine, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(CORPUS, encoding="utf-8")
    base = ["perplexity", "--model", str(tiny_hf_dir), "--max-seq-len", "128", "--ctx", "64", "--dtype", "fp32"]
    assert main(base + ["--file", str(text), "--json", "--chunks", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ppl"] == pytest.approx(perplexity(engine, CORPUS, ctx=64, max_chunks=2).ppl)
    assert out["chunks"] == 2 and out["weights"] == "float32"
    assert main(base + ["--file", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt: no such file" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin1"))
    assert main(base + ["--file", str(tmp_path / "latin1.txt")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    assert main(base[:-4] + ["--ctx", "4096", "--file", str(text)]) == 2
    assert "must be an integer from 4 to the engine's max_seq_len (128)" in capsys.readouterr().err


@needs_smollm2
def test_the_4bit_path_costs_little_perplexity():
    """The embedded model on the first ~1,000 tokens of the README: its GGUF's 4-bit layers run by the cpu
    kernels (int8 activations, int8 LM head) against the same weights dequantized to fp32."""
    text = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")[:6000]
    ppl = {}
    for quant in ("none", "q4"):
        eng = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=256, quant=quant)
        ppl[quant] = perplexity(eng, text, ctx=256, max_chunks=3).ppl
    assert abs(ppl["q4"] / ppl["none"] - 1) < 0.05, ppl


def test_it_waits_for_no_run_of_another_thread_and_is_refused_beside_one(engine):
    """As prompt_logprobs: a chunk's forward beside another thread's run on the engine is refused by name (they
    would share the engine's compute, and a server's run is someone's request)."""
    import threading
    stream = engine.stream("hello there", max_new_tokens=8, chat=False, ignore_eos=True)
    next(stream)                              # this thread's run is open: perplexity here is fine (no overtaking)
    assert perplexity(engine, CORPUS, ctx=32, max_chunks=1).tokens > 0
    errors = []
    worker = threading.Thread(target=lambda: errors.append(_raises(lambda: perplexity(engine, CORPUS, ctx=32))))
    worker.start()
    worker.join()
    stream.close()
    assert errors and isinstance(errors[0], InputError) and "another thread" in str(errors[0]), errors
    assert perplexity(engine, CORPUS, ctx=32, max_chunks=1).tokens > 0


def _raises(fn):
    try:
        fn()
    except Exception as e:        # noqa: BLE001 - the test inspects what was raised
        return e
    return None
