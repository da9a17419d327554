"""Differential QA of text handling, 2026-12-07: StreamDecoder against Tokenizer.decode (random ids, random chunks,
skip_special_tokens, showing(), context ids) on six vocabularies; decode/encode against transformers' tokenizers;
render_chat against transformers' apply_chat_template on random conversations. A seeded sweep each, then one test per
bug found."""
from __future__ import annotations

import json
import random

import pytest

import test_chat_templates_qa as known
import test_qwen_user_qa as qwen
from amphista_engine.chat import BUILTIN_TEMPLATES, VICUNA_SYSTEM_PROMPT, render_chat
from amphista_engine.errors import InputError
from amphista_engine.tokenizer import load_tokenizer
from conftest import CORPUS, SMOLLM2_GGUF, write_tokenizer, write_vocab_gguf

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

PIECES = ["é", "ü", "中文", "日本語", "한국어", "😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "e\u0301", "a\u0308\u0323",
          "\x00", "\x1b", "\x7f", " ", "  ", "\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "x", "Hello",
          " world", "123", "'s", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "naïve", "\ufffd", "\U0010ffff", "\ud7ff"]
LONG_RUNS = [" " * 3000, "\n" * 2000, "\t \n" * 700, "\u3000" * 1500, "\u00a0" * 1000, "\r\n" * 900, "😀" * 400]


def random_text(rng, n=None) -> str:
    return "".join(rng.choice(PIECES) if rng.random() < 0.7 else rng.choice(CORPUS[:200])
                   for _ in range(rng.randint(0, 15) if n is None else n))


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """name -> (Tokenizer, folder transformers loads or None): SmolLM2's GGUF, a byte-level BPE as tokenizer.json
    and as a GGUF (control, user-defined and unused rows), a sentencepiece BPE with byte fallback as tokenizer.model,
    as a GGUF and as a Llama-2-style tokenizer.json (ByteFallback decoder)."""
    import sentencepiece
    from tokenizers import AddedToken, Tokenizer as HF, decoders, models, normalizers

    root = tmp_path_factory.mktemp("text_diff")
    out = {}
    if SMOLLM2_GGUF.is_file():
        out["smollm2"] = (load_tokenizer(SMOLLM2_GGUF), None)
    bpe = root / "bpe_json"
    bpe.mkdir()
    write_tokenizer(bpe, 400)
    out["bpe_json"] = (load_tokenizer(bpe), bpe)
    model = json.loads((bpe / "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    types = [3 if t in ("<unk>", "<s>", "</s>") else 1 for t in tokens]
    tokens += ["<|im_start|>", "<|im_end|>", "naïve", "[PAD7]", "<my é>"]
    types += [3, 3, 4, 5, 4]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    out["bpe_gguf"] = (load_tokenizer(write_vocab_gguf(root / "bpe.gguf", tokens, types, model="gpt2", pre="gpt2",
                                                       merges=merges, bos=1, eos=len(tokens) - 4)), None)
    spm = root / "spm"
    spm.mkdir()
    rng = random.Random(0)
    corpus = [random_text(rng, 30).replace("<s>", "").replace("</s>", "") for _ in range(200)] + CORPUS.splitlines()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(spm / "tokenizer"), vocab_size=500, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.98, user_defined_symbols=["<|im_end|>"],
        minloglevel=2)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm / "tokenizer.model"))
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
             else 4 if pieces[i] == "<|im_end|>" else 1 for i in range(n)]
    out["spm_model"] = (load_tokenizer(spm), None)
    out["spm_gguf"] = (load_tokenizer(write_vocab_gguf(root / "spm.gguf", pieces, types, model="llama", bos=1, eos=2,
                                                       unk=0, space_prefix=True,
                                                       scores=[sp.get_score(i) for i in range(n)])), None)
    js = root / "spm_json"
    js.mkdir()
    tok = HF(models.BPE({p: i for i, p in enumerate(pieces)}, [], unk_token="<unk>", byte_fallback=True,
                        fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.save(str(js / "tokenizer.json"))
    (js / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    out["spm_json"] = (load_tokenizer(js), js)
    return out


def random_ids(tok, rng) -> list[int]:
    """Encoded text (cut anywhere), or random ids heavy in byte pieces, specials and ids past the vocabulary."""
    if rng.random() < 0.35:
        ids = tok.encode(random_text(rng))
        return ids[rng.randrange(len(ids)):] if ids and rng.random() < 0.3 else ids
    low = sorted(tok.byte_run_ids) or range(min(tok.vocab_size, 300))
    specials = sorted(tok.special_ids)
    out = []
    for _ in range(rng.randint(0, 20)):
        q = rng.random()
        out.append(rng.choice(low) if q < 0.35 else rng.choice(specials) if q < 0.45 and specials
                   else tok.vocab_size + rng.randrange(50) if q < 0.5 else rng.randrange(tok.vocab_size))
    return out


def stream_error(tok, ids, context, skip, rng) -> str | None:
    """Push ids in random chunks (ints and lists): the text streamed so far is always a prefix of the final text,
    streamed + pending is decode of the ids so far (flush() where nothing is pending changes nothing), and all of it +
    flush is decode(ids) (with context: what
    decode(context + ids) adds to decode(context)). The one documented exception: a ByteFallback run of byte pieces
    that starts in the context and is invalid as a whole streams as the pushed ids alone decode."""
    alone = tok.decode(ids, skip)
    wants = [alone]
    if context:
        before, full = tok.decode(context, skip), tok.decode(context + ids, skip)
        wants = [full[len(before):]] + ([alone] if tok.byte_run_ids else []) if full.startswith(before) else [alone]
    decoder, out, i = tok.stream_decoder(skip, context=context), "", 0
    while i < len(ids):
        k = rng.choice([1, 1, 1, 2, 3, 7])
        out += decoder.push(ids[i:i + k] if k > 1 or rng.random() < 0.5 else ids[i])
        i += k
        if rng.random() < 0.05 and not decoder.pending:
            out += decoder.flush()      # nothing held: the stream goes on as if it had not been called
        if not any(w.startswith(out) for w in wants):
            return f"after {i} ids the stream showed {out!r}, not a prefix of {wants[0]!r}"
        now = tok.decode(ids[:i], skip)
        if not context and "\ufffd" not in now and out + decoder.pending != now:
            return f"after {i} ids streamed + pending is {out + decoder.pending!r}, decode {now!r}"
    out += decoder.flush()
    if out not in wants:
        return f"the stream gave {out!r}, decode {wants[0]!r}"
    if decoder.pending or decoder.token_ids != ids:
        return f"after flush pending={decoder.pending!r}, token_ids={decoder.token_ids}"
    return None


def test_stream_decoder_sweep(vocabs):
    rng = random.Random(20261207)
    names = sorted(vocabs)
    for case in range(40000):
        name = names[case % len(names)]
        tok = vocabs[name][0]
        ids = random_ids(tok, rng)
        context = random_ids(tok, rng) if rng.random() < 0.3 else []
        skip = rng.random() < 0.5
        shown = rng.sample(sorted(tok.special_ids), 1) if skip and rng.random() < 0.2 else []
        with tok.showing(shown):
            error = stream_error(tok, ids, context, skip, rng)
        assert error is None, (name, case, ids, context, skip, shown, error)


def test_decode_and_encode_match_transformers_sweep(vocabs):
    """Where transformers loads the same files (the tokenizer.json folders): the same ids for random text, long
    whitespace runs included, the same text for random ids; the byte-level BPE gives the text back exactly."""
    rng = random.Random(7)
    for name in ("bpe_json", "spm_json"):
        tok, folder = vocabs[name]
        reference = transformers.AutoTokenizer.from_pretrained(str(folder))
        for case in range(1500):
            text = random_text(rng) if case % 10 else rng.choice(LONG_RUNS) + random_text(rng, 3)
            ids = tok.encode(text, add_bos=False)
            assert ids == reference.encode(text, add_special_tokens=False), (name, text)
            if name == "bpe_json" and "<s>" not in text and "</s>" not in text:
                assert tok.decode(ids) == text
            for skip in (False, True):
                some = ids if rng.random() < 0.5 else [rng.randrange(tok.vocab_size) for _ in range(20)]
                assert tok.decode(some, skip) == reference.decode(some, skip_special_tokens=skip), (name, some)


# -- chat templates -------------------------------------------------------------------------------------------------

_SNIPPETS = ["hi", "Hello there", " lead", "trail ", "\n", "  ", "", "ü中文🐍", "e\u0301", "\x00\x1b", "{{ x }}",
             "{% raw %}", "</s>", "<|im_end|>", "\t\t", "CONTINUE", "a" * 50, "\u2028", "'quote\"", "\\n"]
_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "w", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def _snippet(rng) -> str:
    return "".join(rng.choice(_SNIPPETS) for _ in range(rng.randint(0, 4)))


def random_conversation(rng) -> list[dict]:
    messages = [{"role": "system", "content": _snippet(rng)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 5)):
        r = rng.random()
        if r < 0.45:
            messages.append({"role": "user", "content": _snippet(rng)})
        elif r < 0.8:
            m = {"role": "assistant", "content": _snippet(rng)}
            if rng.random() < 0.3:
                m[rng.choice(["reasoning_content", "reasoning", "thinking"])] = _snippet(rng) or "hmm"
            messages.append(m)
        elif r < 0.9:
            arguments = rng.choice([{"city": _snippet(rng)}, json.dumps({"city": "Oslo"})])
            call = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
            messages.append({"role": "assistant", "content": rng.choice([None, "", _snippet(rng)]),
                             "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "tool_call_id": "abcdefghi", "content": _snippet(rng)})
    if rng.random() < 0.4 and messages[-1]["role"] != "assistant":
        messages.append({"role": "assistant", "content": _snippet(rng) or "x"})
    if rng.random() < 0.05:
        messages[-1] = {**messages[-1], "name": None}
    return messages


class _Stub:
    chat_template = None

    def __init__(self, bos, eos):
        self.bos_token, self.eos_token = bos or "", eos or ""


def _reference(template, bos, eos):
    from tokenizers import Tokenizer, models

    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    tokens = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template, **tokens)


def chat_templates():
    """name -> (template, bos_token, eos_token): the well-known templates the QA tests hold, Qwen3's, SmolLM2's from
    its GGUF and the built-ins."""
    out = {name: (t, *known.SPECIAL.get(name, ("<s>", "</s>"))) for name, t in known.TEMPLATES.items()}
    out["qwen3"] = (qwen.QWEN3_TEMPLATE, None, "<|im_end|>")
    if SMOLLM2_GGUF.is_file():
        smol = load_tokenizer(SMOLLM2_GGUF)
        out["smollm2"] = (smol.chat_template, smol.bos_token, smol.eos_token)
    out.update({f"builtin {k}": (v, "<s>", "</s>") for k, v in BUILTIN_TEMPLATES.items()})
    return out


def test_render_chat_matches_apply_chat_template_sweep():
    """Random conversations (tool calls and results, None/empty contents, reasoning under each of its names,
    unicode, Jinja-looking text), add_generation_prompt on and off, continue_final_message, tools and
    enable_thinking: the same text, or an InputError where transformers raises. (The built-in vicuna_v1.1 reads
    default_system_prompt, which render_chat passes: the reference gets it too.)"""
    rng = random.Random(11)
    templates = chat_templates()
    names = sorted(templates)
    references = {}
    same = raised = 0
    for case in range(4000):
        name = names[case % len(names)]
        template, bos, eos = templates[name]
        if name not in references:
            references[name] = _reference(template, bos, eos)
        reference = references[name]
        messages = random_conversation(rng)
        cont = messages[-1]["role"] == "assistant" and rng.random() < 0.5
        gen = not cont and rng.random() < 0.6
        variables = {"tools": [_TOOL]} if rng.random() < 0.2 else {}
        if rng.random() < 0.2:
            variables["enable_thinking"] = rng.random() < 0.5
        what = (name, case, messages, gen, cont, variables)
        try:
            want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                                 continue_final_message=cont,
                                                 default_system_prompt=VICUNA_SYSTEM_PROMPT, **variables)
        except Exception:
            with pytest.raises(InputError):
                render_chat(_Stub(bos, eos), messages, template, add_generation_prompt=gen,
                            continue_final_message=cont, variables=variables or None)
            raised += 1
            continue
        got = render_chat(_Stub(bos, eos), messages, template, add_generation_prompt=gen,
                          continue_final_message=cont, variables=variables or None)
        assert got == want, what
        same += 1
    assert same > 2400 and raised > 300, (same, raised)


# -- bugs found -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["spm_model", "spm_gguf", "spm_json"])
def test_a_flush_with_nothing_held_keeps_the_next_words_space(vocabs, name):
    """flush() restarted the decode window even when it emitted nothing, so the next `▁word` was read as the
    first piece of a text and lost its space: <s> then 'f' streamed '<s>f' where decode gives '<s> f'."""
    tok = vocabs[name][0]
    word = tok.encode("Hello world", add_bos=False)
    decoder = tok.stream_decoder()
    out = decoder.push(tok.bos_id) + decoder.flush()
    for i in word:
        out += decoder.push(i) + decoder.flush()
    assert out == tok.decode([tok.bos_id, *word]) == "<s> Hello world"


@pytest.mark.parametrize("name", ["spm_model", "spm_gguf", "spm_json"])
def test_a_context_ending_in_skipped_specials_keeps_the_first_words_space(vocabs, name):
    """The context window was the last 4 ids that decode without U+FFFD, though they may decode to nothing (skipped
    specials, padded embedding rows): the first pushed `▁word` then lost the space decode(context + ids) keeps."""
    tok = vocabs[name][0]
    context = tok.encode("Hello", add_bos=False) + [tok.bos_id, tok.bos_id, tok.eos_ids[0], tok.vocab_size + 3]
    ids = tok.encode("world", add_bos=False)
    want = tok.decode(context + ids, True)[len(tok.decode(context, True)):]
    decoder = tok.stream_decoder(skip_special_tokens=True, context=context)
    assert decoder.push(ids) + decoder.flush() == want == " world"


def test_reasoning_under_its_other_names_reaches_the_template_as_in_transformers():
    """transformers aliases a message's `reasoning` and `thinking` to reasoning_content (and thinking, for gpt-oss):
    render_chat passed them as they came, so Qwen3's template wrote an empty <think></think> for a reply whose
    reasoning was sent back as `reasoning` (vLLM's newer field name)."""
    reads = "{% for m in messages %}[{{ m.reasoning_content }}|{{ m.thinking }}]{{ m.content }}{% endfor %}"
    for field in ("reasoning", "thinking", "reasoning_content"):
        messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", field: "because"}]
        for template in (qwen.QWEN3_TEMPLATE, reads):
            want = _reference(template, None, "<|im_end|>").apply_chat_template(messages, tokenize=False)
            got = render_chat(_Stub(None, "<|im_end|>"), messages, template, add_generation_prompt=False)
            assert got == want and "because" in got, (field, got)
