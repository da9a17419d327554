"""QA of prompt formatting (chat.py, Engine.encode_prompt, `amphista chat`), 2026-12-05: well-known chat templates
rendered and tokenized against transformers' apply_chat_template with the same template string, and each bug
found pinned by a test."""
from __future__ import annotations

import io
import json
import re
import shutil

import pytest

from amphista_engine import Engine, InputError
from amphista_engine.chat import render_chat
from amphista_engine.cli import main
from amphista_engine.tokenizer import load_tokenizer
from conftest import CORPUS

transformers = pytest.importorskip("transformers", reason="transformers' apply_chat_template is the reference")

# The templates as their model repos ship them (tokenizer_config.json's chat_template).
LLAMA2_CHAT = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_mess"
    "age = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message"
    " = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (lo"
    "op.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/"
    "assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content"
    " = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set conte"
    "nt = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' "
    "+ content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.stri"
    "p() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
LLAMA3_INSTRUCT = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_he"
    "ader_id|>' + message['role'] + '<|end_header_id|>\n"
    "\n"
    "'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_toke"
    "n + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_head"
    "er_id|>assistant<|end_header_id|>\n"
    "\n"
    "' }}{% endif %}"
)
LLAMA32_INSTRUCT = (
    "{{- bos_token }}\n"
    "{%- if custom_tools is defined %}\n"
    "    {%- set tools = custom_tools %}\n"
    "{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n"
    "    {%- set tools_in_user_message = true %}\n"
    "{%- endif %}\n"
    "{%- if not date_string is defined %}\n"
    "    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n"
    "    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set system_message = \"\" %}\n"
    "{%- endif %}\n"
    "\n"
    "{#- System message #}\n"
    "{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n"
    "{%- if tools is not none %}\n"
    "    {{- \"Environment: ipython\\n\" }}\n"
    "{%- endif %}\n"
    "{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n"
    "{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "{%- if tools is not none and not tools_in_user_message %}\n"
    "    {{- \"You have access to the following functions. To call a function, please respond with JSO"
    "N for a function call.\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name"
    " and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "{%- endif %}\n"
    "{{- system_message }}\n"
    "{{- \"<|eot_id|>\" }}\n"
    "\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n"
    "    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first us"
    "er message!\") }}\n"
    "{%- endif %}\n"
    "    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name"
    " and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n"
    "    {%- for t in tools %}\n"
    "        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n"
    "    {%- endfor %}\n"
    "    {{- first_user_message + \"<|eot_id|>\"}}\n"
    "{%- endif %}\n"
    "\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) "
    "%}\n"
    "        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'"
    "] | trim + '<|eot_id|>' }}\n"
    "    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n"
    "        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n"
    "        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n"
    "        {{- \"}\" }}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n"
    "        {%- else %}\n"
    "            {{- message.content }}\n"
    "        {%- endif %}\n"
    "        {{- \"<|eot_id|>\" }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
MISTRAL_V01 = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % "
    "2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/.."
    ".') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]"
    "' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ rai"
    "se_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
MISTRAL_V02 = (
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must alternat"
    "e user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
MISTRAL_V03 = (
    "{%- if messages[0][\"role\"] == \"system\" %}\n"
    "    {%- set system_message = messages[0][\"content\"] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "{%- if not tools is defined %}\n"
    "    {%- set tools = none %}\n"
    "{%- endif %}\n"
    "{%- set user_messages = loop_messages | selectattr(\"role\", \"equalto\", \"user\") | list %}\n"
    "\n"
    "{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}"
    "\n"
    "{%- set ns = namespace() %}\n"
    "{%- set ns.index = 0 %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if not (message.role == \"tool\" or message.role == \"tool_results\" or (message.tool_calls "
    "is defined and message.tool_calls is not none)) %}\n"
    "        {%- if (message[\"role\"] == \"user\") != (ns.index % 2 == 0) %}\n"
    "            {{- raise_exception(\"After the optional system message, conversation roles must alte"
    "rnate user/assistant/user/assistant/...\") }}\n"
    "        {%- endif %}\n"
    "        {%- set ns.index = ns.index + 1 %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if message[\"role\"] == \"user\" %}\n"
    "        {%- if tools is not none and (message == user_messages[-1]) %}\n"
    "            {{- \"[AVAILABLE_TOOLS] [\" }}\n"
    "            {%- for tool in tools %}\n"
    "                {%- set tool = tool.function %}\n"
    "                {{- '{\"type\": \"function\", \"function\": {' }}\n"
    "                {%- for key, val in tool.items() if key != \"return\" %}\n"
    "                    {%- if val is string %}\n"
    "                        {{- '\"' + key + '\": \"' + val + '\"' }}\n"
    "                    {%- else %}\n"
    "                        {{- '\"' + key + '\": ' + val|tojson }}\n"
    "                    {%- endif %}\n"
    "                    {%- if not loop.last %}\n"
    "                        {{- \", \" }}\n"
    "                    {%- endif %}\n"
    "                {%- endfor %}\n"
    "                {{- \"}}\" }}\n"
    "                {%- if not loop.last %}\n"
    "                    {{- \", \" }}\n"
    "                {%- else %}\n"
    "                    {{- \"]\" }}\n"
    "                {%- endif %}\n"
    "            {%- endfor %}\n"
    "            {{- \"[/AVAILABLE_TOOLS]\" }}\n"
    "            {%- endif %}\n"
    "        {%- if loop.last and system_message is defined %}\n"
    "            {{- \"[INST] \" + system_message + \"\\n\\n\" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- else %}\n"
    "            {{- \"[INST] \" + message[\"content\"] + \"[/INST]\" }}\n"
    "        {%- endif %}\n"
    "    {%- elif message.tool_calls is defined and message.tool_calls is not none %}\n"
    "        {{- \"[TOOL_CALLS] [\" }}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- set out = tool_call.function|tojson %}\n"
    "            {{- out[:-1] }}\n"
    "            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}\n"
    "                {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!"
    "\") }}\n"
    "            {%- endif %}\n"
    "            {{- ', \"id\": \"' + tool_call.id + '\"}' }}\n"
    "            {%- if not loop.last %}\n"
    "                {{- \", \" }}\n"
    "            {%- else %}\n"
    "                {{- \"]\" + eos_token }}\n"
    "            {%- endif %}\n"
    "        {%- endfor %}\n"
    "    {%- elif message[\"role\"] == \"assistant\" %}\n"
    "        {{- \" \" + message[\"content\"]|trim + eos_token}}\n"
    "    {%- elif message[\"role\"] == \"tool_results\" or message[\"role\"] == \"tool\" %}\n"
    "        {%- if message.content is defined and message.content.content is defined %}\n"
    "            {%- set content = message.content.content %}\n"
    "        {%- else %}\n"
    "            {%- set content = message.content %}\n"
    "        {%- endif %}\n"
    "        {{- '[TOOL_RESULTS] {\"content\": ' + content|string + \", \" }}\n"
    "        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}\n"
    "            {{- raise_exception(\"Tool call IDs should be alphanumeric strings with length 9!\") }"
    "}\n"
    "        {%- endif %}\n"
    "        {{- '\"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}\n"
    "    {%- else %}\n"
    "        {{- raise_exception(\"Only user and assistant roles are supported, with the exception of "
    "an initial optional system message!\") }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
)
VICUNA = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{"
    "% for message in messages %}{% if message['role'] == 'system' %}{{message['content'] + ' '}}{% e"
    "lif message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' '}}{% elif message['role'] "
    "== 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + ' '}}{% endif %}{% endfor %}{% if add_g"
    "eneration_prompt %}{{ 'ASSISTANT: '}}{% endif %}"
)
QWEN25 = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou"
    " are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and argum"
    "ents within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"argume"
    "nts\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assis"
    "tant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message"
    ".role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n"
    "' + message['content'] + '<|im_end|>' + '\n"
    "'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
    "' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not suppo"
    "rted') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.inde"
    "x0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assista"
    "nt/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %"
    "}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n"
    "' + message['content'] | trim + '<end_of_turn>\n"
    "' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n"
    "'}}{% endif %}"
)
PHI3 = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'user' %}{{'<|user|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n"
    "' + message['content'] + '<|end|>\n"
    "'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n"
    "' }}{% else %}{{ eos_token }}{% endif %}"
)
ZEPHYR = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n"
    "' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n"
    "'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)


TEMPLATES = dict(llama2_chat=LLAMA2_CHAT, llama3_instruct=LLAMA3_INSTRUCT, llama32_instruct=LLAMA32_INSTRUCT,
                 mistral_v01=MISTRAL_V01, mistral_v02=MISTRAL_V02, mistral_v03=MISTRAL_V03, vicuna=VICUNA,
                 qwen25=QWEN25, chatml=CHATML, gemma=GEMMA, phi3=PHI3, zephyr=ZEPHYR)
# (bos_token, eos_token) as the models declare them; the rest use Llama's <s> and </s>.
LLAMA3_TOKENS = ("<|begin_of_text|>", "<|eot_id|>")
SPECIAL = dict(llama3_instruct=LLAMA3_TOKENS, llama32_instruct=LLAMA3_TOKENS,
               gemma=("<bos>", "<eos>"), qwen25=(None, "<|im_end|>"), chatml=("<|im_start|>", "<|im_end|>"),
               phi3=("<s>", "<|endoftext|>"))
MARKERS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[INST]", "[/INST]", "<start_of_turn>",
           "<end_of_turn>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",
           "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]"]
TOOL_CALL = {"id": "abcdefghi", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
CASES = {
    "one user message": [{"role": "user", "content": "Hello there, ü 中文 🐍"}],
    "system + user": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! "},
                   {"role": "user", "content": "2+2?"}],
    "system + multi-turn": [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "x"}],
    "jinja-looking text": [{"role": "user", "content": "{{ x }} {% if %} {# c #} {% raw %} </s> <s> \\n\n  lead"}],
    "empty content": [{"role": "user", "content": ""}],
    "whitespace": [{"role": "user", "content": "  \n padded \n "}],
    "assistant first": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
    "unknown role": [{"role": "narrator", "content": "n"}, {"role": "user", "content": "u"}],
    "tool messages": [{"role": "user", "content": "Weather?"},
                      {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                      {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temp": 3}'}],
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE whose added tokens are every template's markers (trained once for the module)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=400, special_tokens=MARKERS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path_factory.mktemp("chat_tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _folder(tmp_path, tokenizer_json, template, bos="<s>", eos="</s>", add_bos=True):
    tmp_path.mkdir(parents=True, exist_ok=True)
    shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
    config = {"bos_token": bos, "eos_token": eos, "add_bos_token": add_bos}
    if template is not None:
        config["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name", TEMPLATES)
def test_well_known_templates_match_transformers(name, tokenizer_json, tmp_path):
    """Text and token ids equal apply_chat_template's, for every message shape; where the template raises (roles
    it rejects, an assistant first), ours is a named InputError. Token ids: a BOS the template writes is never
    doubled by the tokenizer's add_bos_token; a template that writes none gets one from add_bos_token (llama.cpp's
    rule), which apply_chat_template(tokenize=True) leaves out."""
    bos, eos = SPECIAL.get(name, ("<s>", "</s>"))
    for add_bos in (True, False):
        folder = _folder(tmp_path / str(add_bos), tokenizer_json, TEMPLATES[name], bos, eos, add_bos)
        ours, reference = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
        for case, messages in CASES.items():
            for gen in (True, False):
                what = f"{name}, add_bos={add_bos}, {case}, add_generation_prompt={gen}"
                try:
                    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
                    ids = reference.apply_chat_template(messages, add_generation_prompt=gen, return_dict=False)
                except Exception:
                    with pytest.raises(InputError, match=r"chat template \(model\) raised an error"):
                        render_chat(ours, messages, add_generation_prompt=gen)
                    continue
                assert render_chat(ours, messages, add_generation_prompt=gen) == text, what
                if add_bos and ours.bos_id is not None and ids[:1] != [ours.bos_id]:
                    ids = [ours.bos_id, *ids]
                encoded = ours.encode(text)
                assert encoded == ids, what
                assert encoded[:2] != [ours.bos_id] * 2, what


def test_tools_and_documents_are_none_as_in_transformers():
    """transformers passes tools=None and documents=None: a template's `tools is not none` branch (tool prompts,
    Mistral's [AVAILABLE_TOOLS]) stays shut. Here they were undefined, which `is not none` took as given: every
    prompt got an empty tool block."""
    template = ("{% if tools is not none %}[AVAILABLE_TOOLS] [{% for t in tools %}{{ t }}{% endfor %}]"
                "[/AVAILABLE_TOOLS]{% endif %}{% if documents is not none %}<docs>{% endif %}"
                "{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    messages = [{"role": "user", "content": "Hi"}]
    reference = _reference(template).apply_chat_template(messages, tokenize=False)
    assert render_chat(None, messages, template) == reference == "[INST] Hi [/INST]"
    # Mistral v0.3 without its `tools is defined` guard: the shape of a template that relies on the None
    unguarded = MISTRAL_V03.replace("{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n", "")
    assert unguarded != MISTRAL_V03
    expected = _reference(unguarded).apply_chat_template(messages, tokenize=False)
    assert render_chat(_Stub(), messages, unguarded) == expected == "<s>[INST] Hi[/INST]"


def test_tool_call_messages_without_content_render_as_in_transformers():
    """OpenAI's format gives an assistant turn that only calls tools `content: None`; transformers drops None
    values and renders it. It was refused ("message 1 (assistant) has no 'content'"), and a None `name` reached
    the template, which printed "None"."""
    messages = [{"role": "user", "content": "Weather in Oslo?", "name": None},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "abcdefghi", "content": '{"temp": 3}'}]
    for template in (QWEN25, LLAMA32_INSTRUCT, MISTRAL_V03,
                     "{% for m in messages %}{{ m.role }}{% if m.name is defined %}({{ m.name }}){% endif %};"
                     "{% endfor %}"):
        expected = _reference(template).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_chat(_Stub(), messages, template) == expected
    assert "<tool_call>" in render_chat(None, messages, QWEN25)
    # content is still required where there are no tool calls, and must be text
    for bad in ({"role": "assistant", "content": None}, {"role": "assistant", "content": None, "tool_calls": []},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}):
        with pytest.raises(InputError, match="message 1 .* 'content'; expected a str"):
            render_chat(None, [messages[0], bad], QWEN25)


def test_template_arithmetic_and_recursion_errors_are_named():
    """A template that divides by zero, overflows or recurses without end raised ZeroDivisionError,
    OverflowError or RecursionError with a traceback instead of a named InputError."""
    for template in ("{{ 1 / 0 }}", "{{ messages | length // 0 }}", "{{ 2.0 ** 10000 }}",
                     "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"):
        with pytest.raises(InputError, match=r"chat template \(custom\) failed on these messages: \w+Error"):
            render_chat(None, "hi", template)


def test_chatml_fallback_stops_on_im_end(tiny_hf_dir, tmp_path):
    """A model without a template whose vocabulary has <|im_start|> is prompted in ChatML, so its turns end with
    <|im_end|>; that token was no stop unless the model happened to declare it as EOS, so the answer ran on past
    its end (into a made-up next turn) up to max_new_tokens."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path / "chatml_base"
    folder.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", folder / "config.json")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    weights = load_file(tiny_hf_dir / "model.safetensors")
    save_file(weights, folder / "model.safetensors")
    messages = [{"role": "user", "content": "The quick brown fox"}]

    engine = Engine.from_pretrained(str(folder), device="cpu", max_seq_len=128)
    im_end = engine.tokenizer.token_to_id("<|im_end|>")
    assert engine.tokenizer.decode(engine.encode_prompt(messages)).startswith("<|im_start|>user\n")
    assert im_end in engine.eos_ids and engine.tokenizer.token_to_id("</s>") in engine.eos_ids
    first = engine.generate(messages, max_new_tokens=1).token_ids[0]
    assert first != im_end and first not in engine.eos_ids
    # The same model with <|im_end|>'s LM-head row swapped in where its first answer token's was: it now ends there.
    head = weights["lm_head.weight"]
    head[[first, im_end]] = head[[im_end, first]]
    save_file(weights, folder / "model.safetensors")
    result = Engine.from_pretrained(str(folder), device="cpu", max_seq_len=128).generate(messages, max_new_tokens=8)
    assert result.finish_reason == "eos" and result.token_ids == [] and result.text == ""


def test_cli_chat_names_its_fallback_and_carries_the_whole_history(tiny_hf_dir, monkeypatch, capsys):
    """`amphista chat` said only "using the engine's fallback", not which format; each turn's prompt is the whole
    conversation (system, the earlier exchanges with the answers as printed, the new message) rendered at once."""
    prompts = []
    stream = Engine.stream

    def recorded(self, prompt, **kwargs):
        prompts.append([dict(m) for m in prompt])
        return stream(self, prompt, **kwargs)

    monkeypatch.setattr(Engine, "stream", recorded)
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick brown fox\njumps over\n/reset\nagain\n"))
    rc = main(["chat", "--model", str(tiny_hf_dir), "--device", "cpu", "--max-new-tokens", "4", "--max-seq-len",
               "256", "--heads", "none", "--system", "Be brief."])
    out, err = capsys.readouterr()
    assert rc == 0 and "no chat template of its own; using the built-in vicuna_v1.1 format" in err
    answers = out.split("\n")[:3]
    system = {"role": "system", "content": "Be brief."}
    assert prompts == [[system, {"role": "user", "content": "the quick brown fox"}],
                       [system, {"role": "user", "content": "the quick brown fox"},
                        {"role": "assistant", "content": answers[0]}, {"role": "user", "content": "jumps over"}],
                       [system, {"role": "user", "content": "again"}]]
    assert render_chat(None, prompts[1], "vicuna_v1.1") == (
        f"Be brief. USER: the quick brown fox ASSISTANT: {answers[0]}</s>USER: jumps over ASSISTANT:")
    assert re.search(r"prompt \d+ tok", err)


class _Stub:
    """What render_chat reads from a tokenizer, with Llama's <s> and </s>."""
    chat_template, bos_token, eos_token = None, "<s>", "</s>"


def _reference(template):
    from tokenizers import Tokenizer, models
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=template,
                                                bos_token="<s>", eos_token="</s>")
