"""Tool calls in chat (issue 30.5), through the official `openai` client against the gateway: the tools reach the
model's own chat template, forced calls are written under structured output (valid arguments every time), calls
come back parsed in tool_calls, streamed too, and a conversation carrying calls and their results renders.

The model is a random Llama with SmolLM2's tokenizer and a Hermes-style template that takes tools: it checks the
plumbing, not a model's judgement (Qwen 2.5 Instruct, Hermes 3 and SmolLM3 write calls in this format for real)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from coordinator.api.http_launch import settings_beside, start_gateway
from coordinator.config import CoordinatorConfig
from coordinator.serving.tools import CallStream
from tests.clusters import registered, text_llama

MODEL, PLAIN = "tool-llama", "plain-llama"
TEMPLATE = """{%- if tools %}<|im_start|>system
You may call these tools:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <arguments>}
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days"],
           "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast for a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
                                           "parameters": {"type": "object", "additionalProperties": False,
                                                          "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                                          "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What will the weather be in Paris?"}]


@pytest.fixture(scope="module")
def gateway(loop, store, parameters, tmp_path_factory):
    text_llama(store, MODEL, tmp_path_factory, seed=13, template=TEMPLATE)
    text_llama(store, PLAIN, tmp_path_factory, seed=13)
    config = CoordinatorConfig(store=store.root, port=0, http_port=0, parameters_address=parameters.address,
                               deployments=[{"name": MODEL, "workers": 1}, {"name": PLAIN, "workers": 1}],
                               heartbeat_timeout_ms=3_600_000)
    with registered(loop, config, 2) as (coordinator, _):
        http = loop.run(start_gateway(settings_beside(config, coordinator.server.port)))
        yield http.url
        loop.run(http.stop())


@pytest.fixture(scope="module")
def oai(gateway):
    with openai.OpenAI(base_url=gateway, api_key="none", max_retries=0, timeout=120) as client:
        yield client


def test_a_forced_call_comes_back_parsed_with_valid_arguments(oai):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    for seed in range(4):
        answer = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, seed=seed,
                                             temperature=1.0, max_tokens=120)
        c = answer.choices[0]
        assert c.finish_reason == "tool_calls" and not c.message.content
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    required = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=9,
                                           temperature=1.0, max_tokens=120)
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")


def test_a_streamed_forced_call_arrives_whole_in_a_delta(oai):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    events = list(oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=choice, seed=1,
                                              temperature=1.0, max_tokens=120, stream=True))
    calls = [t for e in events for ch in e.choices for t in (ch.delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER)
    assert events[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(ch.delta.content or "" for e in events for ch in e.choices) == ""  # no call text as content


def test_a_conversation_with_calls_and_results_is_rendered_by_the_template(oai):
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "days": 2}'}}
    turns = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]
    plain = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, max_tokens=3, temperature=0)
    longer = oai.chat.completions.create(model=MODEL, messages=turns, tools=TOOLS, max_tokens=3, temperature=0)
    # the call and its result are in the prompt: the tool response's tokens, and the call's
    assert longer.usage.prompt_tokens > plain.usage.prompt_tokens + 15
    none = oai.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=3,
                                       temperature=0)
    assert none.usage.prompt_tokens < plain.usage.prompt_tokens  # "none": the tools are not offered at all


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]}, "tools",
     "tools[0].parameters is not a JSON schema"),
    ({"tools": TOOLS, "tool_choice": "get_moon"}, "tool_choice", "not auto, none, required or the name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0] must be"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools", "given twice"),
    ({"tools": TOOLS, "model": PLAIN}, "tools", "chat template does not take tools"),
])
def test_bad_tools_are_400_naming_the_field(oai, body, param, words):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(**{"model": MODEL, "messages": ASK, "max_tokens": 4, **body})
    assert err.value.param == param and words in err.value.message


def test_calls_are_taken_out_of_streamed_text_however_it_is_cut():
    text = 'Let me check. <tool_call>\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n</tool_call>\nDone.'
    for size in (1, 3, 7, len(text)):
        stream, content, calls = CallStream(), "", []
        for i in range(0, len(text), size):
            piece, done = stream.push(text[i:i + size])
            content, calls = content + piece, calls + done
        content += stream.flush()[0]
        assert content == "Let me check. Done." and [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_time", {"city": "Oslo"})]
    stream = CallStream()
    assert stream.push("<tool_call>not json</tool_call> <tool_ca")[0] == "<tool_call>not json</tool_call> "
    assert stream.flush()[0] == "<tool_ca"  # an unfinished block is text
