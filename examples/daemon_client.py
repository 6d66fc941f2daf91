"""Talk to `edge-runtime serve` with the official openai package, streamed and not.

    edge-runtime serve &            # 127.0.0.1:8000
    python examples/daemon_client.py
"""

from __future__ import annotations

import openai

client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="not-needed-unless---api-key")
model = client.models.list().data[0].id

reply = client.chat.completions.create(model=model, max_tokens=48, temperature=0.7,
                                       messages=[{"role": "user", "content": "Tell me about the sea."}])
print(reply.choices[0].message.content)

for chunk in client.completions.create(model=model, prompt="The ship sailed", max_tokens=32, stream=True):
    print(chunk.choices[0].text, end="", flush=True)
print()
