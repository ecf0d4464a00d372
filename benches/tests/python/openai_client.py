"""The official `openai` client against `gantry mock`: chat and completions, streaming and not.

Usage: python openai_client.py BASE_URL   (e.g. http://127.0.0.1:8000/v1)
Exits non-zero with a message on the first mismatch.
"""
import sys

import openai


def main() -> None:
    base = sys.argv[1]
    client = openai.OpenAI(base_url=base, api_key="unused")

    models = client.models.list()
    assert [m.id for m in models.data] == ["mock-model"], models

    chat = client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8,
    )
    assert chat.object == "chat.completion", chat
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content, chat
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.completion_tokens == 8, chat.usage
    assert chat.usage.prompt_tokens_details.cached_tokens == 0

    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    assert "".join(pieces) == chat.choices[0].message.content, (pieces, chat)
    assert finish == "length"
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens_details.cached_tokens > 0, "the second identical prompt hits the prefix cache"

    comp = client.completions.create(model="mock-model", prompt="Once upon a time", max_tokens=5)
    assert comp.object == "text_completion"
    assert comp.choices[0].text and comp.usage.completion_tokens == 5

    text = "".join(c.choices[0].text for c in client.completions.create(
        model="mock-model", prompt="Once upon a time", max_tokens=5, stream=True) if c.choices)
    assert text == comp.choices[0].text, (text, comp.choices[0].text)

    try:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        raise AssertionError("unknown model accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404
    try:
        client.completions.create(model="mock-model", prompt="x", max_tokens=0)
        raise AssertionError("max_tokens=0 accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400
    print("openai client: 6 calls ok")


if __name__ == "__main__":
    main()
