"""Tool calling through a model's own chat template where it has a tools section (Hermes / Qwen <tool_call>,
Llama 3.x bare JSON, Mistral [TOOL_CALLS]): detection, the calls read in each family's format, the tools, earlier
calls and results rendered by the template, and a required call through the server with the official clients."""

from __future__ import annotations

import json

import pytest

from slmkit.serve import tools as tl

# a Qwen2.5-style template, shortened: the tools in the system turn, calls in <tool_call> tags, results in <tool_response>
HERMES = (
    "{%- if tools %}<|im_start|>system\n{%- if messages[0].role == 'system' %}\n{{ messages[0].content }}{%- endif %}\n"
    "<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "Call a function as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{% elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n</tool_response><|im_end|>\n"
    "{% elif message.tool_calls %}<|im_start|>assistant\n{{ message.content }}"
    "{%- for tc in message.tool_calls %}\n<tool_call>\n{\"name\": \"{{ tc.function.name }}\", \"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>"
    "{%- endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = HERMES.replace("<tool_call>", "<|python_tag|>").replace("</tool_call>", "")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
TOOLS = tl.check_tools([WEATHER])


def test_families_are_told_by_their_templates():
    from conftest import CHATML

    assert tl.family_of(HERMES) == "hermes" and tl.family_of(LLAMA3) == "llama3"
    assert tl.family_of("{% if tools %}[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == "mistral"
    assert tl.family_of(CHATML) is None and tl.family_of(None) is None  # no tools section: the text protocol
    assert tl.family_of("{{ '<tool_call>' }}") is None  # a marker without a tools section is not one


def test_calls_read_in_each_familys_format():
    text = 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n' \
           '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    content, calls = tl.native_calls("hermes", text, TOOLS)
    assert content == "Let me look." and [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    _, calls = tl.native_calls("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}', TOOLS)  # unclosed: the end
    assert len(calls) == 1
    _, calls = tl.native_calls("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}', TOOLS)
    assert calls[0]["function"]["name"] == "get_weather" and json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    content, calls = tl.native_calls("mistral", 'ok [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', TOOLS)
    assert content == "ok" and len(calls) == 1
    for fam, bad in [("hermes", "<tool_call>{not json</tool_call>"), ("hermes", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'),
                     ("llama3", "The weather is fine."), ("mistral", "[TOOL_CALLS] nope")]:
        assert tl.native_calls(fam, bad, TOOLS) == (bad, [])  # not a call to a tool given: text
    assert tl.call_schema(TOOLS, "required", "llama3")["required"] == ["name", "parameters"]
    assert tl.call_schema(TOOLS, "required", "mistral")["type"] == "array"


@pytest.fixture
def hermes_model(store, tmp_path):
    from conftest import build_tiny_llama
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path / "hermes", context=2048, chat_template=HERMES), "tiny-hermes")
    import_path(build_tiny_llama(tmp_path / "llama3", context=2048, chat_template=LLAMA3), "tiny-llama3")
    return "tiny-hermes"


def test_the_template_renders_tools_calls_and_results(hermes_model):
    import slmkit
    from slmkit.model import encode_chat

    m = slmkit.load(hermes_model)
    convo = [{"role": "user", "content": "Weather in Paris?"},
             {"role": "assistant", "content": "", "tool_calls": [tl.native_call({"id": "call_1", "function": {
                 "name": "get_weather", "arguments": '{"city": "Paris"}'}})]},
             {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 21 C"}]
    prompt = m.backend.decode(encode_chat(m.backend, convo, tl.openai_tools(TOOLS)))
    assert '<tools>{"type": "function", "function": {"name": "get_weather"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    gen = m.stream_chat(convo[:1], tools=tl.openai_tools(TOOLS), prefill="<tool_call>\n", max_tokens=2, temperature=0)
    gen.read()
    assert m.backend.decode(gen.prompt_ids).endswith("<|im_start|>assistant\n<tool_call>\n")  # the answer starts after the marker


def test_a_required_call_through_the_servers_with_the_official_clients(hermes_model):
    import ollama
    from openai import OpenAI

    from test_serve import Running

    s = Running(["tiny-hermes", "tiny-llama3"], max_tokens_limit=80)
    try:
        c = OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        msgs = [{"role": "user", "content": "Weather in Paris?"}]
        r = c.chat.completions.create(model="tiny-hermes", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=70, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
        follow = msgs + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                         {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
        again = c.chat.completions.create(model="tiny-hermes", messages=follow, tools=[WEATHER], max_tokens=6, temperature=0)
        assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
        r = c.chat.completions.create(model="tiny-llama3", messages=msgs, tools=[WEATHER], max_tokens=70, temperature=0,
                                      tool_choice={"type": "function", "function": {"name": "get_weather"}})
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
        # Ollama has no tool_choice: an answer in the family's format is a call (held to it here by `format`)
        shape = tl.call_schema(TOOLS, "required", "llama3")
        o = ollama.Client(host=s.url).chat(model="tiny-llama3", messages=msgs, tools=[WEATHER], format=shape,
                                           options={"temperature": 0, "num_predict": 70})
        assert o.message.tool_calls[0].function.name == "get_weather" and o.message.tool_calls[0].function.arguments["city"] in ("Paris", "Rome")
    finally:
        s.stop()
