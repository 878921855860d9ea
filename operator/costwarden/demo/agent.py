"""A simulated coding agent: the official OpenAI SDK, calling through the gateway.

It reviews "files" one after another (a different prompt each time, so the retry-loop
heuristic rightly stays quiet), offering a tool, which the demo policy routes to the
frontier model, and stops when the gateway refuses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import openai

PROMPT_WORDS = 3000
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "read_file",
            "description": "Read a file of the repository under review.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
]


@dataclass
class CallResult:
    status: int
    model: str = ""
    rule: str = ""
    error: str = ""


class Agent:
    def __init__(self, gateway_url: str) -> None:
        # The sidecar identifies the pod, so the key is a placeholder the SDK insists on;
        # no retries, so a refusal shows at once.
        self.client = openai.OpenAI(
            base_url=f"{gateway_url}/v1", api_key="unused-in-sidecar-mode", max_retries=0
        )
        self.calls = 0

    def review_next_file(self) -> CallResult:
        self.calls += 1
        diff = " ".join(f"line{self.calls}_{i}" for i in range(PROMPT_WORDS))
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model="gpt-4.1",
                messages=[
                    {"role": "system", "content": "You review code changes."},
                    {"role": "user", "content": f"Review change #{self.calls}: {diff}"},
                ],
                tools=TOOLS,  # type: ignore[arg-type]
                extra_headers={"X-Costwarden-Task": "code-review"},
            )
        except openai.APIStatusError as error:
            return CallResult(error.status_code, error=_error_message(error))
        raw.parse()
        return CallResult(
            raw.http_response.status_code,
            model=raw.headers.get("x-costwarden-model", ""),
            rule=raw.headers.get("x-costwarden-rule", ""),
        )


def _error_message(error: openai.APIStatusError) -> str:
    body = error.body if isinstance(error.body, dict) else {}
    detail = body.get("error", body) if isinstance(body, dict) else {}
    if isinstance(detail, dict) and detail.get("message"):
        return str(detail["message"])
    return str(error)
