"""The clients people build on, pointed at `slmkit serve` over a real socket: langchain-openai (chat, streaming,
tools, structured output, embeddings, the Responses API) and litellm (completion, streaming, embeddings), each
answering what the official openai client gets for the same request."""

from __future__ import annotations

import json

import pytest

from test_serve import Running, client

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"], "additionalProperties": False}}}
ANSWER = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"], "additionalProperties": False}


@pytest.fixture
def served(store, tmp_path):
    from conftest import build_tiny_llama
    from slmkit.sources.importer import import_path

    import_path(build_tiny_llama(tmp_path / "long", context=2048), "tinylong")  # tool descriptions need room
    s = Running(["tinylong"], max_tokens_limit=80)
    yield s
    s.stop()


def test_langchain_openai(served):
    from langchain_core.messages import HumanMessage
    from langchain_openai import ChatOpenAI, OpenAIEmbeddings

    url = served.url + "/v1"
    llm = ChatOpenAI(base_url=url, api_key="unused", model="tinylong", max_tokens=6, temperature=0, max_retries=0)
    want = client(served).chat.completions.create(model="tinylong", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                                  temperature=0).choices[0].message.content
    got = llm.invoke([HumanMessage("hi")])
    assert got.content == want and got.usage_metadata["output_tokens"] == 6
    assert "".join(chunk.content for chunk in llm.stream("hi")) == want
    called = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?", max_tokens=60)
    assert called.tool_calls[0]["name"] == "get_weather" and called.tool_calls[0]["args"]["city"] in ("Paris", "Rome")
    shaped = llm.with_structured_output({"title": "verdict", **ANSWER}, method="json_schema").invoke("Yes or no?", max_tokens=20)
    assert shaped["answer"] in ("yes", "no")
    # langchain's default sends tiktoken ids (other tokens in this vocabulary); its documented switch sends text
    emb = OpenAIEmbeddings(base_url=url, api_key="unused", model="tinylong", check_embedding_ctx_length=False)
    vectors = emb.embed_documents(["a", "bb"])
    assert len(vectors) == 2 and len(vectors[0]) == 32
    assert emb.embed_query("bb") == pytest.approx(vectors[1], abs=1e-5)
    responses = ChatOpenAI(base_url=url, api_key="unused", model="tinylong", max_tokens=6, temperature=0, max_retries=0,
                           use_responses_api=True)
    assert responses.invoke("hi").text == want


def test_litellm(served, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list
    import litellm

    url = served.url + "/v1"
    msgs = [{"role": "user", "content": "hi"}]
    want = client(served).chat.completions.create(model="tinylong", messages=msgs, max_tokens=6, temperature=0).choices[0].message.content
    r = litellm.completion(model="openai/tinylong", api_base=url, api_key="unused", messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.content == want and r.usage.completion_tokens == 6
    parts = litellm.completion(model="openai/tinylong", api_base=url, api_key="unused", messages=msgs, max_tokens=6,
                               temperature=0, stream=True)
    assert "".join(p.choices[0].delta.content or "" for p in parts) == want
    called = litellm.completion(model="openai/tinylong", api_base=url, api_key="unused", messages=[{"role": "user", "content": "Weather?"}],
                                tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0)
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
    e = litellm.embedding(model="openai/tinylong", api_base=url, api_key="unused", input=["a", "bb"])
    assert len(e.data) == 2 and len(e.data[0]["embedding"]) == 32
    with pytest.raises(litellm.exceptions.NotFoundError):
        litellm.completion(model="openai/nope", api_base=url, api_key="unused", messages=msgs, max_tokens=2, num_retries=0)
