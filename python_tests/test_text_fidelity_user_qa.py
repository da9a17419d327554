"""QA of the text a user gets back (2026-12-05): `stream` chunks, `generate(...).text`, `generate_batch` and the CLI's
stdout must be the same text, `decode(token_ids, skip_special_tokens=True)`, for plain, sampled and speculative runs
(which accept several tokens a step), with multi-byte UTF-8, answers cut mid-character and stop strings.

Bugs pinned here:
- special tokens the model emits that are not EOS (`<|im_start|>` after a raw ChatML prompt) were printed in the
  answer; they are left out now, as Hugging Face's pipelines and vLLM do, while stop strings still match them;
- a stop string completed by the last token of a run whose text ends in an incomplete character (held back until
  the run's final flush at EOS or max_new_tokens) was never looked for: the text went past the stop.

The scripted decoder feeds the loop exact token sequences through the embedded model's real tokenizer; the rest
runs the embedded SmolLM2 itself with a few new tokens."""
from __future__ import annotations

import io
import sys

import pytest
import torch

from conftest import needs_smollm2

from amphista_engine import cli
from amphista_engine.engine import Engine
from amphista_engine.generation import GenerationStats, run

pytestmark = needs_smollm2

RAW_CHATML = "<|im_start|>user\nSay hi<|im_end|>\n"      # chat=False: the model opens the next turn itself
IM_START = "<|im_start|>"


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    eng = Engine.from_pretrained("smollm2-135m", device="cpu", dtype="fp32", max_seq_len=512)
    yield eng
    eng.load_heads(None)


class Scripted:
    """A decoder that emits fixed token lists, `width` of them a step (a speculative step accepts several)."""

    def __init__(self, script: list[list[int]], width: int = 1):
        self.script, self.width, self.device = script, width, torch.device("cpu")

    def prefill(self, prompts):
        self.pos, self.steps = [1] * len(prompts), 0
        return torch.tensor([s[0] for s in self.script])

    def step(self):
        self.steps += 1
        assert self.steps < 1000, "the loop asked for more tokens than the scripts hold"
        out = torch.zeros(len(self.script), self.width, dtype=torch.long)
        count = torch.zeros(len(self.script), dtype=torch.long)
        for b, s in enumerate(self.script):
            chunk = s[self.pos[b]:self.pos[b] + self.width]     # nothing once a row's script is done
            if chunk:
                out[b, :len(chunk)], count[b] = torch.tensor(chunk), len(chunk)
            self.pos[b] += len(chunk)
        return out, count


def scripted_run(tok, script, *, width=1, max_new=64, stop=(), eos=(2, 0)):
    """(texts, streamed chunks per row, finish reasons) of run() over a scripted decoder."""
    dec = Scripted(script, width)
    chunks = [[] for _ in script]
    for b, delta in run(dec, [[5]] * len(script), tok, max_new, list(eos), list(stop),
                        [GenerationStats() for _ in script]):
        chunks[b].append(delta)
    return [r.text for r in dec.rows], chunks, [r.finish_reason for r in dec.rows]


# -- the loop, on exact token sequences ---------------------------------------------------------------------------

@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("end", ["length", "eos"])
def test_a_stop_completed_in_text_held_until_the_final_flush_still_stops(engine, width, end):
    """' 日' is three tokens, ' \\xe6', '\\x97', '\\xa5': the first one's space completes the stop ': ', but its text
    is held (it ends in half a character) until the next token; when the run ends right there (max_new_tokens,
    or EOS next) the held text came out at the flush with the stop inside it and finish_reason 'length'/'eos'."""
    tok = engine.tokenizer
    ids = tok.encode("Repeat exactly: 日本語", add_bos=False)
    assert tok.decode(ids[3:4]) == " \ufffd" and tok.decode(ids[:4]) == "Repeat exactly: \ufffd"
    script = ids[:4] + ([2] if end == "eos" else [])
    texts, chunks, why = scripted_run(tok, [script], width=width, max_new=4 if end == "length" else 30,
                                      stop=[": "])
    assert texts == ["Repeat exactly"] and "".join(chunks[0]) == "Repeat exactly" and why == ["stop"]
    # 'Hi 😀': the stop 'Hi ' ends inside ' \xf0\x9f\x98', the last token before the cut
    ids = tok.encode("Hi 😀", add_bos=False)
    texts, chunks, why = scripted_run(tok, [ids[:2]], width=width, max_new=2, stop=["Hi "])
    assert texts == [""] and chunks == [[]] and why == ["stop"]
    # no stop inside: the cut character still ends the text in U+FFFD, as decode(token_ids) does
    texts, chunks, why = scripted_run(tok, [ids[:2]], width=width, max_new=2, stop=["Hi  "])
    assert texts == ["Hi \ufffd"] == ["".join(chunks[0])] and why == ["length"]
    # a stop on U+FFFD matches the character the cut left unfinished, not the ones still arriving in pieces
    ids = tok.encode("Repeat exactly: 日本語", add_bos=False)
    script = ids[:-1] + ([2] if end == "eos" else [])
    texts, chunks, why = scripted_run(tok, [script], width=width, max_new=len(ids) - 1 if end == "length" else 30,
                                      stop=["\ufffd"])
    assert texts == ["Repeat exactly: 日本"] == ["".join(chunks[0])]
    assert why == ["stop" if end == "length" else "eos"]    # EOS ended it first: the flushed text is still cut
    if end == "eos":        # a stop_token_ids id alike: its stop_reason (and usage's count of it) is the id's
        dec = Scripted([script], width)
        list(run(dec, [[5]], tok, 30, [0], ["\ufffd"], [GenerationStats()], stop_ids=[2]))
        assert (dec.rows[0].text, dec.rows[0].finish_reason, dec.rows[0].stop_reason) == ("Repeat exactly: 日本", "stop", 2)


@pytest.fixture(scope="module")
def byte_fallback_tokenizer(tmp_path_factory):
    """A Llama-2-style tokenizer.json (tokenizers' ByteFallback decoder): a run of byte pieces is held back until a
    piece that is not a byte ends it."""
    import json
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers
    from amphista_engine.tokenizer import load_tokenizer
    folder = tmp_path_factory.mktemp("byte_fallback")
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", IM_START]
    tok = HFTokenizer(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>", IM_START)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    return load_tokenizer(folder)


def test_stops_in_byte_runs_held_back_by_a_byte_fallback_decoder(byte_fallback_tokenizer):
    """An emoji spelled in byte pieces is held until a text piece ends the run: when EOS or max_new_tokens came
    first, the flush printed it past the stop '😀'. A skipped special token after a held byte run stands after it."""
    tok = byte_fallback_tokenizer
    ids = tok.encode("Hi 😀", add_bos=False)
    assert tok.decode(ids) == "Hi 😀" and len(ids) == 8      # ▁ H i ▁ and four bytes: no merges
    for width in (1, 4):
        for script, max_new in ((ids + [2], 30), (ids, len(ids))):
            for stop, expected in ((["😀"], "Hi "), ([" 😀"], "Hi"), (["😀!"], "Hi 😀")):
                texts, chunks, why = scripted_run(tok, [script], width=width, max_new=max_new, stop=stop, eos=(2,))
                assert texts == [expected] == ["".join(chunks[0])], (stop, width, script)
                assert why == ["stop" if expected != "Hi 😀" else "eos" if script[-1] == 2 else "length"]
        ids = tok.encode("Hi 😀" + IM_START + " there", add_bos=False)
        for stop, expected in (([IM_START], "Hi 😀"), (["😀" + IM_START], "Hi "), ([], "Hi 😀  there")):
            texts, chunks, why = scripted_run(tok, [ids + [2]], width=width, stop=stop, eos=(2,))
            assert texts == [expected] == ["".join(chunks[0])], (stop, width)
        ids = tok.encode("Hi 😀", add_bos=False)


def test_special_tokens_are_left_out_of_the_text_and_stops_still_match_them(engine):
    """A raw prompt lets the model emit `<|im_start|>` (not an EOS): the answer printed it. Now the text, every
    chunk and every batch row leave special tokens out (decode(ids, skip_special_tokens=True)); a stop string that
    names one, or spans one and the text around it, still stops where it did, and the text ends before it."""
    tok = engine.tokenizer
    answer = "Hello!\n" + IM_START + "user\nNaïve 日本 😀 café" + IM_START + "assistant\nok"
    ids = tok.encode(answer, add_bos=False)
    visible = tok.decode(ids, skip_special_tokens=True)
    assert visible == "Hello!\nuser\nNaïve 日本 😀 caféassistant\nok" and ids.count(1) == 2
    cases = [((), visible, "length"),
             ([IM_START], "Hello!\n", "stop"),
             (["\n" + IM_START + "user"], "Hello!", "stop"),         # text, special, text
             (["im_start"], "Hello!\n", "stop"),                    # inside a special's text: cut where it stands
             (["é" + IM_START], "Hello!\nuser\nNaïve 日本 😀 caf", "stop"),
             (["😀 c", "日本 😀"], "Hello!\nuser\nNaïve ", "stop"),  # overlapping: the first one completed
             (["user", "use"], "Hello!\n", "stop"),                 # one a prefix of the other
             (["Hello", "H"], "", "stop"),                           # at the very start
             (["caféassistant"], visible, "length")]                # only the text with specials shown is matched
    for width in (1, 2, 5):
        for stop, expected, reason in cases:
            texts, chunks, why = scripted_run(tok, [ids, ids[:9] + [2]], width=width, max_new=len(ids), stop=stop)
            assert texts[0] == expected and why[0] == reason, (width, stop, texts[0])
            assert "".join(chunks[0]) == expected and not any(IM_START in c for c in chunks[0])
            assert texts[1] == "".join(chunks[1]) and IM_START not in texts[1]


def test_streamed_chunks_never_show_text_past_a_stop(engine):
    """Random stop strings over a multilingual answer with a special token inside, whatever tokens a step brings:
    the chunks join to the text, which ends right before the first stop completed."""
    import random
    tok = engine.tokenizer
    ids = tok.encode("Ünïcödé: 日本語のテキスト 🎉🎉 done." + IM_START + "\n\n  x = 1", add_bos=False)
    full = tok.decode(ids, skip_special_tokens=True)
    at = full.index("\n\n  x")          # where the special token stands: a stop across it does not match
    rng = random.Random(0)
    for _ in range(60):
        i = rng.randrange(len(full))
        stop = full[i:i + rng.randint(1, 5)]
        if full.find(stop) < at < full.find(stop) + len(stop):
            continue
        for width in (1, 4):
            texts, chunks, why = scripted_run(tok, [ids], width=width, max_new=len(ids), stop=[stop])
            assert texts[0] == full[:full.find(stop)] == "".join(chunks[0]) and why == ["stop"], (stop, width)


# -- the embedded model ----------------------------------------------------------------------------------------

PROMPTS = [(RAW_CHATML, False, 12), ("Repeat exactly: 日本語のテキスト", None, 9),
           ("Le café est très", False, 10), ("Write three emoji:", None, 7)]
RUNS = [("plain greedy", None, {}), ("plain seeded", None, dict(temperature=0.8, top_p=0.95, seed=7)),
        ("amphista", "default", dict(speculative="amphista")), ("medusa", "smollm2-135m-medusa",
                                                                dict(speculative="medusa"))]


@pytest.mark.parametrize("name, heads, options", RUNS, ids=[r[0] for r in RUNS])
def test_stream_generate_and_decode_give_the_same_text(engine, name, heads, options):
    tok = engine.tokenizer
    engine.load_heads(heads)
    for prompt, chat, n in PROMPTS:
        chunks = list(engine.stream(prompt, n, chat=chat, **options))
        streamed = engine.last_result
        result = engine.generate(prompt, n, chat=chat, **options)
        assert result.token_ids == streamed.token_ids
        assert "".join(chunks) == result.text == tok.decode(result.token_ids, skip_special_tokens=True), prompt
        assert not any(IM_START in c for c in chunks)
        if prompt == RAW_CHATML:
            assert result.token_ids[0] == tok.token_to_id(IM_START) and result.text.startswith("assistant\n")
            stopped = engine.generate(prompt, n, chat=chat, stop=IM_START, **options)
            assert stopped.text == "" and stopped.finish_reason == "stop" and stopped.token_ids == result.token_ids[:1]


def test_generate_batch_rows_are_the_texts_of_their_tokens(engine):
    engine.load_heads(None)
    prompts = ["<|im_start|>system\nYou are helpful.<|im_end|>\n", "Le café est très", "Write three emoji:"]
    results = engine.generate_batch(prompts, 8, chat=False)
    alone = engine.generate(prompts[0], 8, chat=False)
    assert results[0].text == alone.text and results[0].token_ids == alone.token_ids
    for r in results:
        assert r.text == engine.tokenizer.decode(r.token_ids, skip_special_tokens=True) and IM_START not in r.text


def test_cli_prints_the_api_text(engine, monkeypatch, capsys):
    """`amphista generate` and `amphista chat` stdout is the answer text, without special tokens."""
    engine.load_heads(None)
    monkeypatch.setattr(Engine, "from_pretrained", classmethod(lambda cls, *a, **k: engine))
    expected = engine.generate(RAW_CHATML, 12, chat=False).text
    common = ["--heads", "none", "--max-new-tokens", "12", "--device", "cpu", "--dtype", "fp32"]
    assert cli.main(["generate", RAW_CHATML, "--no-chat", *common]) == 0
    assert capsys.readouterr().out == expected + "\n" and IM_START not in expected
    expected = engine.generate("Repeat exactly: 日本語", 12).text
    monkeypatch.setattr(sys, "stdin", io.StringIO("Repeat exactly: 日本語\n"))
    assert cli.main(["chat", "--no-reuse-prefix", *common]) == 0
    assert capsys.readouterr().out == expected + "\n"
