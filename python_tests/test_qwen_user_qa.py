"""A user brings a Qwen2.5 or Qwen3 model: tiny look-alikes of the hub's folders (bf16 safetensors, a transformers
4.4x config.json with Qwen's keys, a Qwen tokenizer.json whose added specials are <|endoftext|> = BOS/pad,
<|im_start|>, <|im_end|>, tokenizer_config.json with the real ChatML templates and no BOS, generation_config.json with
eos [<|im_end|>, <|endoftext|>] and sampling defaults) and of llama.cpp's GGUFs of them ([PADn] rows, pre 'qwen2',
no BOS), run as such a user runs them: chat generate/stream against transformers, the CLI, batches, speculation with
saved heads, distill + train, and what is refused."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from amphista_engine import Engine
from amphista_engine.cli import main
from amphista_engine.errors import AmphistaError, ConfigError, InputError
from amphista_engine.heads import random_heads, save_heads
from conftest import add_gguf_keys, finish_unpermuted_gguf, hf_gguf_keys

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread_module")

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
              r"\s+(?!\S)|\s+")
CORPUS = ("The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens and the target "
          "model verifies them in one pass. 0123456789 + - * / = ( ) [ ] { } \n\t Hello, world! You are Qwen, "
          "created by Alibaba Cloud. You are a helpful assistant. system user assistant\ndef f(x):\n    return x * 2\n"
          ) * 20
VOCAB = 384          # config.json's vocab_size: past the tokenizer's ids, as Qwen's 151936 is past its 151665
JOKE, CODE = "Tell me a joke.", "def f(x):"
# The chat templates of Qwen2.5-*-Instruct's and Qwen3's tokenizer_config.json, as published
QWEN25_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    '    {%- else %}\n'
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    '    {%- endif %}\n'
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou'
    ' are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and argum'
    'ents within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"argume'
    'nts\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    '    {%- else %}\n'
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assis"
    "tant.<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- for message in messages %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message'
    '.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    '        {%- if message.content %}\n'
    "            {{- '\\n' + message.content }}\n"
    '        {%- endif %}\n'
    '        {%- for tool_call in message.tool_calls %}\n'
    '            {%- if tool_call.function is defined %}\n'
    '                {%- set tool_call = tool_call.function %}\n'
    '            {%- endif %}\n'
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    '            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n'
    '            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n"
    '        {%- endfor %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- message.content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '{%- endif %}\n'
)
QWEN3_TEMPLATE = (
    '{%- if tools %}\n'
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- messages[0].content + '\\n\\n' }}\n"
    '    {%- endif %}\n'
    '    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are'
    ' provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    '    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n'
    '        {{- tool | tojson }}\n'
    '    {%- endfor %}\n'
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and argum'
    'ents within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"argume'
    'nts\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    '{%- else %}\n'
    "    {%- if messages[0].role == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}\n'
    '{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n'
    '{%- for message in messages[::-1] %}\n'
    '    {%- set index = (messages|length - 1) - loop.index0 %}\n'
    '    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(m'
    "essage.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %"
    '}\n'
    '        {%- set ns.multi_step_tool = false %}\n'
    '        {%- set ns.last_query_index = index %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- for message in messages %}\n'
    '    {%- if message.content is string %}\n'
    '        {%- set content = message.content %}\n'
    '    {%- else %}\n'
    "        {%- set content = '' %}\n"
    '    {%- endif %}\n'
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {%- set reasoning_content = '' %}\n"
    '        {%- if message.reasoning_content is string %}\n'
    '            {%- set reasoning_content = message.reasoning_content %}\n'
    '        {%- else %}\n'
    "            {%- if '</think>' in content %}\n"
    "                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<th"
    "ink>')[-1].lstrip('\\n') %}\n"
    "                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}\n"
    '            {%- endif %}\n'
    '        {%- endif %}\n'
    '        {%- if loop.index0 > ns.last_query_index %}\n'
    '            {%- if loop.last or (not loop.last and reasoning_content) %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n'"
    ") + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n"
    '            {%- else %}\n'
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '            {%- endif %}\n'
    '        {%- else %}\n'
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n"
    '        {%- endif %}\n'
    '        {%- if message.tool_calls %}\n'
    '            {%- for tool_call in message.tool_calls %}\n'
    '                {%- if (loop.first and content) or (not loop.first) %}\n'
    "                    {{- '\\n' }}\n"
    '                {%- endif %}\n'
    '                {%- if tool_call.function %}\n'
    '                    {%- set tool_call = tool_call.function %}\n'
    '                {%- endif %}\n'
    '                {{- \'<tool_call>\\n{"name": "\' }}\n'
    '                {{- tool_call.name }}\n'
    '                {{- \'", "arguments": \' }}\n'
    '                {%- if tool_call.arguments is string %}\n'
    '                    {{- tool_call.arguments }}\n'
    '                {%- else %}\n'
    '                    {{- tool_call.arguments | tojson }}\n'
    '                {%- endif %}\n'
    "                {{- '}\\n</tool_call>' }}\n"
    '            {%- endfor %}\n'
    '        {%- endif %}\n'
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    '        {%- endif %}\n'
    "        {{- '\\n<tool_response>\\n' }}\n"
    '        {{- content }}\n'
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    '        {%- endif %}\n'
    '    {%- endif %}\n'
    '{%- endfor %}\n'
    '{%- if add_generation_prompt %}\n'
    "    {{- '<|im_start|>assistant\\n' }}\n"
    '    {%- if enable_thinking is defined and enable_thinking is false %}\n'
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    '    {%- endif %}\n'
    '{%- endif %}'
)


# ---- the look-alikes ---------------------------------------------------------------------------------------

def write_qwen_tokenizer(path: Path, family: str) -> dict:
    """tokenizer.json as Qwen's (NFC, Qwen's split regex, byte-level, the specials appended after the merges' ids),
    tokenizer_config.json (bos_token null, eos <|im_end|>, no add_bos_token) and generation_config.json."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False, trim_offsets=False)])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=330, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    specials = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    plain = ("<think>", "</think>") if family == "qwen3" else ()       # Qwen3's: added, not special
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    tok.save(str(path / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in specials + plain}
    added = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": t in specials} for t, i in ids.items()}
    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "added_tokens_decoder": added, "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "chat_template": QWEN25_TEMPLATE if family == "qwen2" else QWEN3_TEMPLATE,
        "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}, indent=2))
    eot, im_end = ids["<|endoftext|>"], ids["<|im_end|>"]
    (path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": eot, "pad_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot],
        "repetition_penalty": 1.05, "temperature": 0.7, "top_p": 0.8, "top_k": 20}, indent=2))
    return ids


def write_qwen(path: Path, family: str, tied: bool, **over) -> dict:
    """A random Qwen2.5 / Qwen3 folder as the hub holds one (bf16 weights, Qwen's config.json keys)."""
    path.mkdir(parents=True)
    ids = write_qwen_tokenizer(path, family)
    eot = ids["<|endoftext|>"]
    cfg = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": eot, "eos_token_id": eot,
           "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 128,
           "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 4,
           "num_hidden_layers": 2, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
           "sliding_window": 32768, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
           "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB}
    if family == "qwen3":       # Qwen3's head_dim is not hidden_size / heads (0.6B: 1024 wide, 16 heads of 128)
        cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False, head_dim=32,
                   max_position_embeddings=40960, max_window_layers=28, rope_scaling=None, rope_theta=1000000,
                   sliding_window=None, transformers_version="4.51.0")
    cfg.update(over)
    Config = transformers.Qwen2Config if family == "qwen2" else transformers.Qwen3Config
    Model = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = Model(Config(**{k: v for k, v in cfg.items() if k not in ("torch_dtype", "transformers_version")}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    model.to(torch.bfloat16).save_pretrained(path, safe_serialization=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))    # the hub's keys, not transformers 5's
    write_qwen_tokenizer(path, family)                                 # save_pretrained wrote its own generation_config
    return ids


def hf_reference(path: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    # plain greedy: not the folder's generation_config.json (sampling, repetition_penalty 1.05)
    model.generation_config = transformers.GenerationConfig(do_sample=False, pad_token_id=0)
    return transformers.AutoTokenizer.from_pretrained(str(path)), model


def hf_greedy(model, prompt_ids, n=30, eos=None):
    with torch.no_grad():
        # the mask given: pad_token_id 0 is '!' here, which generate() would mask out of the prompt
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, eos_token_id=eos)
    return out[0, len(prompt_ids):].tolist()


def chat_ids(tok, messages):
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def force(path: Path, prompt_ids, token: int, eos=None, keep=(), steps=range(1, 8)):
    """Rewrites the folder's (untied) LM head so that greedy decoding of prompt_ids emits `token` after at least one
    other token (and before `eos`): its row becomes 1.5x the row of a token chosen there. keep: (prompt ids, answer)
    pairs whose greedy answers (up to `eos`) must stay as they are."""
    from safetensors.torch import load_file, save_file
    w = load_file(str(path / "model.safetensors"))
    before = w["lm_head.weight"][token].clone()
    for step in steps:
        _, model = hf_reference(path)
        chosen = hf_greedy(model, prompt_ids, step + 1)[step]
        w["lm_head.weight"][token] = w["lm_head.weight"][chosen] * 1.5
        save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
        _, model = hf_reference(path)
        out = hf_greedy(model, prompt_ids, 30, eos)
        if token in out[1:] and out[0] != token and all(hf_greedy(model, p, 30, eos) == a for p, a in keep):
            return out
        w["lm_head.weight"][token] = before
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    raise AssertionError("could not make the model emit the token")


def write_qwen_gguf(hf_dir: Path, out: Path, qtype="F32", eos="<|im_end|>", arch=None) -> Path:
    """llama.cpp's convert_hf_to_gguf.py on such a folder: `qwen2.*`/`qwen3.*` keys, Q/K rows as stored (no RoPE
    permutation), Qwen's specials CONTROL, <think> USER_DEFINED, the rows past the tokenizer [PADn] UNUSED,
    pre 'qwen2', add_bos_token false, BOS = pad = <|endoftext|>, the chat template."""
    import gguf
    from safetensors.torch import load_file
    w = {k: v.float().numpy() for k, v in load_file(str(hf_dir / "model.safetensors")).items()}
    c = json.loads((hf_dir / "config.json").read_text())
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    wr = gguf.GGUFWriter(str(out), arch or c["model_type"])
    wr.add_name("Qwen-tiny")
    add_gguf_keys(wr, **hf_gguf_keys(c))
    if "head_dim" in c:
        wr.add_key_length(c["head_dim"])
        wr.add_value_length(c["head_dim"])
    wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
    wr.add_rope_freq_base(float(c["rope_theta"]))
    vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
    special = {a["content"]: a["special"] for a in tj["added_tokens"]}
    by_id = {i: t for t, i in vocab.items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(c["vocab_size"])]
    T = gguf.TokenType
    types = [T.UNUSED if i not in by_id else T.NORMAL if t not in special else T.CONTROL if special[t]
             else T.USER_DEFINED for i, t in enumerate(tokens)]
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("qwen2")
    wr.add_token_list(tokens)
    wr.add_token_types(types)
    wr.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    wr.add_eos_token_id(vocab[eos])
    wr.add_pad_token_id(vocab["<|endoftext|>"])
    wr.add_bos_token_id(vocab["<|endoftext|>"])
    wr.add_add_bos_token(False)
    wr.add_chat_template(json.loads((hf_dir / "tokenizer_config.json").read_text())["chat_template"])
    finish_unpermuted_gguf(wr, w, c["num_hidden_layers"], qtype)
    return out


def _build(root: Path, family: str, tied: bool, pad: bool = False):
    folder = root / family
    ids = write_qwen(folder, family, tied)
    tok, _ = hf_reference(folder)
    answer, ends = None, [ids["<|im_end|>"], ids["<|endoftext|>"]]
    if not tied:     # forced through the LM head: a tied one's row is also the prompt's <|im_end|> embedding
        joke, code = (chat_ids(tok, [{"role": "user", "content": p}]) for p in (JOKE, CODE))
        answer = force(folder, joke, ids["<|im_end|>"], ends, steps=range(4, 12))     # a few tokens, then the end
        if pad:      # a random model emits a padding row (trained ones never do): the GGUF must print it as nothing
            force(folder, code, VOCAB - 1, ends, keep=[(joke, answer)])
    return SimpleNamespace(folder=folder, gguf=write_qwen_gguf(folder, root / f"{family}.gguf"), ids=ids,
                           joke_answer=answer, family=family)


@pytest.fixture(scope="module")
def qwen25(tmp_path_factory):
    """Qwen2.5-7B-Instruct's layout (q/k/v biases, untied LM head)."""
    return _build(tmp_path_factory.mktemp("qwen25"), "qwen2", tied=False, pad=True)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3-8B's layout (q/k norms, head_dim 32 != 64 / 4 heads, untied LM head)."""
    return _build(tmp_path_factory.mktemp("qwen3"), "qwen3", tied=False)


@pytest.fixture(scope="module")
def qwen3_tied(tmp_path_factory):
    """Qwen3-0.6B's: tied embeddings (no lm_head.weight in the folder, no output.weight in the GGUF)."""
    return _build(tmp_path_factory.mktemp("qwen3_tied"), "qwen3", tied=True)


@pytest.fixture(params=["qwen25", "qwen3"])
def qwen(request):
    return request.getfixturevalue(request.param)


def _engine(path, **kw):
    return Engine.from_pretrained(str(path), device="cpu", max_seq_len=kw.pop("max_seq_len", 256), **kw)


# ---- chat, as transformers runs it ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": JOKE}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world! <think>x</think>"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nHello!"},
     {"role": "user", "content": CODE}],
]


@pytest.mark.parametrize("kind", ["qwen25", "qwen3", "qwen3_tied"])
@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_chat_prompt_and_greedy_answer_are_transformers(request, kind, source):
    """The template renders as transformers renders it (Qwen2.5's default system prompt, Qwen3's think handling),
    no BOS is added, and the greedy answer is transformers' on those ids, ending at <|im_end|> unprinted."""
    qwen = request.getfixturevalue(kind)
    tok, ref = hf_reference(qwen.folder)
    engine = _engine(qwen.folder if source == "folder" else qwen.gguf)
    im_end, eot = qwen.ids["<|im_end|>"], qwen.ids["<|endoftext|>"]
    assert not engine.tokenizer.add_bos and {im_end, eot} <= set(engine.eos_ids)
    for messages in CONVERSATIONS:
        prompt = messages[0]["content"] if len(messages) == 1 else messages     # a str: one user message
        ids = engine.encode_prompt(prompt)
        assert ids == chat_ids(tok, messages) and ids[0] == qwen.ids["<|im_start|>"]
        res = engine.generate(prompt, max_new_tokens=30)
        want = hf_greedy(ref, ids, 30, eos=[im_end, eot])
        assert res.token_ids + ([want[-1]] if res.finish_reason == "eos" else []) == want
        assert res.text == tok.decode(res.token_ids, skip_special_tokens=True)
        assert "".join(engine.stream(prompt, max_new_tokens=30)) == res.text
    if qwen.joke_answer is None:
        return
    joke = engine.generate(JOKE, max_new_tokens=30)      # the model was made to end this one with <|im_end|>
    assert joke.finish_reason == "eos" and joke.token_ids + [im_end] == qwen.joke_answer[:len(joke.token_ids) + 1]
    assert joke.token_ids and "<|im_end|>" not in joke.text


def test_gguf_padding_rows_print_nothing(qwen25):
    """llama.cpp pads a Qwen GGUF's vocabulary to the embedding's rows with [PADn] tokens of type UNUSED, which
    it prints as nothing, as the folder's tokenizer prints nothing for ids past its vocabulary: their names came
    out as answer text ('[PAD383]')."""
    pad = VOCAB - 1
    folder, gguf = _engine(qwen25.folder), _engine(qwen25.gguf)
    assert gguf.tokenizer.decode([pad, 21, pad]) == folder.tokenizer.decode([pad, 21, pad]) != ""
    assert gguf.tokenizer.decode([pad]) == ""
    a, b = folder.generate(CODE, max_new_tokens=20), gguf.generate(CODE, max_new_tokens=20)
    assert pad in a.token_ids and a.token_ids == b.token_ids
    assert b.text == a.text and "".join(gguf.stream(CODE, max_new_tokens=20)) == a.text and "[PAD" not in b.text


# ---- the command line ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_cli_generate_and_chat(qwen, source, capsys, monkeypatch):
    import io
    model = str(qwen.folder if source == "folder" else qwen.gguf)
    engine = _engine(model)
    # greedy, as the API's default: the folder's generation_config.json samples (Qwen's), which the CLI takes
    # unless told not to (python_tests/test_generate_generation_config.py)
    flags = ["--model", model, "--max-seq-len", "256", "--max-new-tokens", "30", "--heads", "none",
             "--generation-config", "none"]
    assert main(["generate", JOKE, *flags]) == 0
    out = capsys.readouterr()
    answer = engine.generate(JOKE, max_new_tokens=30)
    assert out.out == answer.text + "\n" and "finish: eos" in out.err
    # a conversation: each answer is the API's for the history so far (Qwen3 drops the reasoning of past turns)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{JOKE}\n{CODE}\n"))
    assert main(["chat", *flags]) == 0
    history, want = [], []
    for text in (JOKE, CODE):
        history.append({"role": "user", "content": text})
        want.append(engine.generate(history, max_new_tokens=30).text)
        history.append({"role": "assistant", "content": want[-1]})
    assert capsys.readouterr().out == "".join(w + "\n" for w in want)


# ---- batches, speculation, weights ---------------------------------------------------------------------------

PROMPTS = [JOKE, CODE, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world!"}],
           "The quick brown fox jumps over the lazy dog. Speculative decoding drafts several tokens and the target "
           "model verifies them in one pass."]


@pytest.mark.parametrize("dtype,quant", [("fp32", "none"), ("bf16", "none"), ("fp32", "q4"), ("bf16", "q4")])
def test_saved_heads_batches_and_weights_decode_as_plain(qwen, tmp_path, dtype, quant):
    """Random Amphista heads saved and loaded by directory: greedy speculative answers are the plain ones, one
    prompt or a batch, in bf16 and with 4-bit weights (quant='q4'), on the folder and on its GGUF."""
    base = _engine(qwen.folder)
    heads = save_heads(random_heads("amphista", base.model, num_heads=3, seed=1), tmp_path / "heads")
    for model in (qwen.folder, qwen.gguf):
        engine = _engine(model, dtype=dtype, quant=quant, heads=str(heads), max_batch_size=4)
        assert engine.quant == quant
        plain = [engine.generate(p, max_new_tokens=16, speculative="none") for p in PROMPTS]
        spec = [engine.generate(p, max_new_tokens=16, speculative="amphista", tree="dynamic-8") for p in PROMPTS]
        assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
        assert [r.text for r in spec] == [r.text for r in plain]
        batch = engine.generate_batch(PROMPTS, max_new_tokens=16, speculative="none")
        if quant == "q4":       # the 4-bit cpu stack (Qwen's biases and q/k norms in it): a batch's rows are alone's
            assert [r.token_ids for r in batch] == [r.token_ids for r in plain]
        spec_batch = engine.generate_batch(PROMPTS, max_new_tokens=16, speculative="amphista", tree="chain-3")
        assert [r.token_ids for r in spec_batch] == [r.token_ids for r in batch]


# ---- heads training on a Qwen ---------------------------------------------------------------------------------

TRAIN_PROMPTS = [JOKE, CODE, "Hello, world!", "Explain speculative decoding.", "What is 2 + 2?",
                 "Write a haiku about the quick brown fox.", "List three colors.", "Who are you?"]


def _prompts_file(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "source": "mine", "prompt": p}) + "\n"
                            for i, p in enumerate(TRAIN_PROMPTS)))
    return path


def test_distill_then_train_heads_then_speculate(qwen3, tmp_path, capsys):
    model = str(qwen3.folder)
    shard, heads = tmp_path / "d.jsonl", tmp_path / "heads"
    assert main(["distill", "--prompts", str(_prompts_file(tmp_path / "p.jsonl")), "--out", str(shard), "--model",
                 model, "--max-new-tokens", "24", "--max-seq-len", "256", "--batch-size", "4"]) == 0
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    engine = _engine(model)
    for r in records:      # the chat prompt without BOS, the answer the engine gives, without <|im_end|>
        assert r["prompt_ids"] == engine.encode_prompt(r["prompt"])
        assert r["answer_ids"] == engine.generate(r["prompt"], max_new_tokens=24).token_ids
    assert main(["train", "--data", str(shard), "--out", str(heads), "--model", model, "--steps", "3",
                 "--num-heads", "2", "--batch-tokens", "256", "--max-seq-len", "256", "--eval-frac", "0.25"]) == 0
    capsys.readouterr()
    engine.load_heads(str(heads))
    for p in TRAIN_PROMPTS[:4]:
        assert engine.generate(p, max_new_tokens=24, speculative="amphista").token_ids == \
            engine.generate(p, max_new_tokens=24, speculative="none").token_ids


# ---- what is refused ------------------------------------------------------------------------------------------

def _variant(src: Path, dst: Path, **cfg) -> Path:
    shutil.copytree(src, dst)
    c = json.loads((dst / "config.json").read_text())
    c.update(cfg)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


def test_a_short_sliding_window_is_implemented_for_the_engine_and_train(qwen25, tmp_path):
    """use_sliding_window with a window shorter than the cache: the engine refused a longer cache, and `amphista
    train` / `tree-search` a longer --max-seq-len, while the model attended over every position. The model now
    attends over the window (python_tests/test_sliding_window_families_qa.py), so both take it."""
    windowed = _variant(qwen25.folder, tmp_path / "w", use_sliding_window=True, sliding_window=32,
                        max_window_layers=0)
    engine = _engine(windowed)
    assert engine.config.real_window == 32 and engine.config.sliding_layers == (0, 1) and engine.max_seq_len > 32


@pytest.mark.parametrize("update,match", [
    # Qwen3-MoE runs since session 50 (test_moe.py); Qwen2-MoE's shared experts do not
    ({"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]}, "unsupported architecture"),
    ({"model_type": "qwen2_vl", "architectures": ["Qwen2VLForConditionalGeneration"]}, "unsupported architecture"),
    ({"architectures": ["Qwen2ForSequenceClassification"]}, "unsupported architecture"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}}, "rope_scaling type 'mrope'"),
])
def test_qwen_variants_we_do_not_run_are_refused(qwen25, tmp_path, update, match):
    with pytest.raises(ConfigError, match=match):
        _engine(_variant(qwen25.folder, tmp_path / "v", **update))


@pytest.mark.parametrize("arch", ["qwen2moe", "qwen2vl"])        # qwen3moe runs since session 50 (test_moe.py)
def test_gguf_of_a_qwen_we_do_not_run_is_refused(qwen25, tmp_path, arch):
    path = write_qwen_gguf(qwen25.folder, tmp_path / "m.gguf", arch=arch)
    with pytest.raises(AmphistaError, match=f"architecture '{arch}' is not supported"):
        _engine(path)


# ---- chat template variables (Qwen3's enable_thinking) ---------------------------------------------------------

def test_thinking_off_renders_as_transformers_in_the_api_cli_and_server(qwen3, capsys):
    """Qwen3 answers after a <think> block unless its template gets enable_thinking=False, which transformers passes
    as apply_chat_template(..., enable_thinking=False): there was no way to pass it (the user had only the /no_think
    text switch)."""
    import threading
    import urllib.request

    from amphista_engine.serving.server import make_server
    tok, _ = hf_reference(qwen3.folder)
    messages = [{"role": "user", "content": JOKE}]
    want = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        enable_thinking=False)["input_ids"])
    engine = _engine(qwen3.folder)
    thinking = engine.encode_prompt(messages)
    engine.chat_template_kwargs = {"enable_thinking": False}
    assert engine.encode_prompt(messages) == want != thinking
    assert engine.generate(JOKE, max_new_tokens=4).prompt_token_ids == want
    for bad, match in (({"messages": 1}, "may not set messages"), ([1], "must be a dict"),
                       ({"a b": 1}, "must be a dict")):
        engine.chat_template_kwargs = bad
        with pytest.raises(InputError, match=match):
            engine.encode_prompt(messages)
    engine.chat_template_kwargs = {}
    # the CLI
    assert main(["generate", JOKE, "--model", str(qwen3.folder), "--max-new-tokens", "3", "--json",
                 "--chat-template-kwargs", '{"enable_thinking": false}', "--max-seq-len", "256"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt_tokens"] == len(want)
    assert main(["generate", JOKE, "--model", str(qwen3.folder), "--chat-template-kwargs", "[1]"]) == 2
    assert "--chat-template-kwargs must be a dict" in capsys.readouterr().err
    # the server: per request, over the server's own (none here)
    httpd = make_server(engine, port=0, quiet=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        def ask(extra):
            req = urllib.request.Request(httpd.url + "/v1/chat/completions", method="POST",
                                         data=json.dumps({"messages": messages, "max_tokens": 2, **extra}).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())
        status, reply = ask({"chat_template_kwargs": {"enable_thinking": False}})
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(want)
        status, reply = ask({})
        assert status == 200 and reply["usage"]["prompt_tokens"] == len(thinking)
        status, reply = ask({"chat_template_kwargs": {"add_generation_prompt": False}})
        assert status == 400 and reply["error"]["param"] == "chat_template_kwargs"
        assert engine.chat_template_kwargs == {}
    finally:
        httpd.shutdown()
        httpd.server_close()
