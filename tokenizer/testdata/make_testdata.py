#!/usr/bin/env python3
"""Regenerate tokenizer/testdata (tiny HF model dirs + golden vectors). Not needed at test time.

Usage: python3 -m venv /tmp/v && /tmp/v/bin/pip install tokenizers transformers jinja2
       /tmp/v/bin/python tokenizer/testdata/make_testdata.py
Deterministic: the training text comes from a seeded PRNG. Golden vectors come from
transformers (AutoTokenizer + apply_chat_template), with vLLM's message normalisation applied
first (content-part arrays joined with "\n").
"""
import json
import os
import random

from tokenizers import Tokenizer, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers

HERE = os.path.dirname(os.path.abspath(__file__))

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from "
    "or one had by word but not what all were we when your can said there use an each which she "
    "do how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water been "
    "call who oil its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good sentence "
    "man think say great where help through much before line right too mean old any same tell boy "
    "follow came want show also around form three small set put end does another well large must big "
    "even such because turn here why ask went men read need land different home us move try kind hand "
    "picture again change off play spell air away animal house point page letter mother answer found "
    "study still learn should america world hello assistant user system model token weather paris "
    "function tool call json python rust server request response stream cache prefix"
).split()
EXTRA = ["café", "naïve", "über", "日本語", "こんにちは", "😀", "🚀", "Привет", "123", "2024", "3.14", "e-mail", "don't", "it's"]


def corpus(seed: int, n: int):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(4, 16)
        ws = [rng.choice(WORDS) if rng.random() > 0.05 else rng.choice(EXTRA) for _ in range(k)]
        s = " ".join(ws)
        s = s[0].upper() + s[1:]
        s += rng.choice([".", "?", "!", ",", ":", ";"])
        if rng.random() < 0.2:
            s += "\n"
        yield s


QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


def train(split, vocab_size, specials, seed):
    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed, 4000), trainer=trainer)
    return tok


QWEN2_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if custom_tools is defined %}{%- set tools = custom_tools %}{%- endif %}
{%- if not date_string is defined %}{%- set date_string = "26 Jul 2024" %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'system', 'tool'] %}
        {{- raise_exception('unsupported role ' + message.role) }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def write_dir(name, tok, config):
    d = os.path.join(HERE, name)
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"), pretty=False)
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return d


def normalize_vllm(messages):
    """vLLM's "string" content format: text parts joined with '\\n'."""
    out = []
    for m in messages:
        m = dict(m)
        c = m.get("content")
        if isinstance(c, list):
            m["content"] = "\n".join(p["text"] for p in c)
        elif c is None:
            m["content"] = ""
        out.append(m)
    return out


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the weather in a city, e.g. Zürich <today>",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}

CHAT_CASES = [
    {"name": "system_user", "messages": [{"role": "system", "content": "You are a terse assistant."}, {"role": "user", "content": "What is the weather in Paris?"}]},
    {"name": "multi_turn", "messages": [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi, how can I help you today?"}, {"role": "user", "content": "Tell me a long story about a boy and his water."}]},
    {"name": "content_parts", "messages": [{"role": "user", "content": [{"type": "text", "text": "First part."}, {"type": "text", "text": "Second part!"}]}]},
    {"name": "unicode_emoji", "messages": [{"role": "user", "content": "Café naïve über 日本語 こんにちは 😀🚀 Привет — \"quotes\" & <tags>\ttab"}]},
    {"name": "empty_content", "messages": [{"role": "user", "content": ""}]},
    {"name": "no_generation_prompt", "add_generation_prompt": False, "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]},
    {"name": "continue_final", "add_generation_prompt": False, "continue_final_message": True, "messages": [{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "One, two,"}]},
]
CHATML_EXTRA = [
    {"name": "tools", "tools": [WEATHER_TOOL], "messages": [{"role": "user", "content": "Weather in Zürich?"}, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}]}, {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"}]},
]
LLAMA3_EXTRA = [
    {"name": "template_kwargs", "chat_template_kwargs": {"date_string": "01 Jan 2030"}, "messages": [{"role": "system", "content": "  Be brief.  "}, {"role": "user", "content": "  padded  "}]},
]
COMPLETION_CASES = ["Hello world", "", "The water is very cold today.\nNew line", "Café 😀 日本語", "<|im_start|>user\nhi<|im_end|>", "   leading spaces and trailing   "]


def golden(d, chat_cases):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(d)
    raw = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    out = {"chat": [], "completion": []}
    for c in chat_cases:
        agp = c.get("add_generation_prompt", True)
        cfm = c.get("continue_final_message", False)
        kwargs = c.get("chat_template_kwargs", {})
        rendered = t.apply_chat_template(
            normalize_vllm(c["messages"]), tools=c.get("tools"), add_generation_prompt=agp,
            continue_final_message=cfm, tokenize=False, **kwargs,
        )
        ids = t(rendered, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(rendered, add_special_tokens=False).ids
        case = dict(c)
        case.update(add_generation_prompt=agp, continue_final_message=cfm, rendered=rendered, ids=ids)
        out["chat"].append(case)
    for p in COMPLETION_CASES:
        ids = t(p)["input_ids"]
        assert ids == raw.encode(p).ids, p
        out["completion"].append({"prompt": p, "ids": ids, "decoded": t.decode(ids, skip_special_tokens=False), "decoded_skip": t.decode(ids, skip_special_tokens=True)})
    with open(os.path.join(d, "golden.json"), "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")


def main():
    chatml_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train(QWEN_SPLIT, 2000, chatml_specials, 1)
    tok.normalizer = normalizers.NFC()
    d = write_dir("tiny-chatml", tok, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": QWEN2_TEMPLATE,
    })
    golden(d, CHAT_CASES + CHATML_EXTRA)

    llama_specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train(LLAMA3_SPLIT, 1500, llama_specials, 2)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", bos)],
        ),
    ])
    d = write_dir("tiny-llama3", tok, {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
        "bos_token": {"content": "<|begin_of_text|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True, "__type": "AddedToken"},
        "eos_token": "<|eot_id|>",
        "chat_template": [{"name": "default", "template": LLAMA3_TEMPLATE}, {"name": "tool_use", "template": "{{ raise_exception('wrong template picked') }}"}],
    })
    golden(d, CHAT_CASES + LLAMA3_EXTRA)


if __name__ == "__main__":
    main()
