"""The official `openai` Python client against `candle-peft serve` (tests/serve_openai.rs).

    python openai_client.py BASE_URL REQUESTS_JSON

REQUESTS_JSON is a list of {"model", "prompt", "max_tokens", "chat": bool, "stream": bool}. Prints
one JSON list: each request's text (greedy, temperature 0), or {"error": HTTP status} where the
client raised an API error.
"""
import json
import sys

import openai


def run(client, r):
    common = dict(model=r["model"], max_tokens=r["max_tokens"], temperature=0, stream=r["stream"])
    try:
        if r["chat"]:
            messages = [{"role": "user", "content": r["prompt"]}]
            out = client.chat.completions.create(messages=messages, **common)
            if r["stream"]:
                return "".join(c.choices[0].delta.content or "" for c in out if c.choices)
            return out.choices[0].message.content
        out = client.completions.create(prompt=r["prompt"], **common)
        if r["stream"]:
            return "".join(c.choices[0].text for c in out if c.choices)
        return out.choices[0].text
    except openai.APIStatusError as e:
        return {"error": e.status_code}


def main():
    client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
    requests = json.loads(sys.argv[2])
    print(json.dumps([run(client, r) for r in requests]))


if __name__ == "__main__":
    main()
