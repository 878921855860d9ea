"""What the fake upstream answers: deterministic bodies, SSE events and usage (pure).

Token counts derive from the request so a test can compute them: :func:`prompt_tokens`
(3 + per message 4 + words, 10 per tool), half of it "read from the cache"; the reply is
:data:`REPLY` cut to ``max_tokens`` words, one output token a word (a tool call: 12).
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Any

REPLY = "This is a deterministic reply from the fake upstream for your request ."
EMBEDDING_DIMENSIONS = 8
TOOL_ARGUMENTS = '{"query": "weather in Paris"}'
TOOL_OUTPUT_TOKENS = 12


def count_words(text: str) -> int:
    return len(text.split())


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts / blocks
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of a chat/messages prompt: 3 + per message (4 + words), 10 per tool, system too."""
    total = 3 + count_words(_text_of(body.get("system", "")))
    for message in body.get("messages", []):
        total += 4 + count_words(_text_of(message.get("content")))
    return total + 10 * len(body.get("tools") or [])


def cached_tokens(total_prompt: int) -> int:
    """Half the prompt is 'read from the cache': deterministic and never zero in tests."""
    return total_prompt // 2


def reply_words(body: dict[str, Any]) -> list[str]:
    limit = body.get("max_tokens") or body.get("max_completion_tokens") or 1000
    return REPLY.split()[: max(1, int(limit))]


def wants_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first tool offered, unless tool_choice says none or the conversation ends with
    a tool's result: then the model answers in text, so an agent's tool loop ends."""
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") in ("none", {"type": "none"}):
        return None
    if _ends_with_tool_result(body):
        return None
    tool: dict[str, Any] = tools[0]
    return tool


def _ends_with_tool_result(body: dict[str, Any]) -> bool:
    """The last message is a tool's result: chat ``role: tool``, or an Anthropic user
    message with a ``tool_result`` block (as Claude Code sends after running a tool)."""
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict):
        return False
    if last.get("role") == "tool":
        return True
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(block, dict) and block.get("type") == "tool_result" for block in content
    )


def _tool_name(tool: dict[str, Any]) -> str:
    return str(tool.get("function", {}).get("name") or tool.get("name") or "tool")


def openai_usage(body: dict[str, Any]) -> dict[str, Any]:
    prompt = prompt_tokens(body)
    completion = TOOL_OUTPUT_TOKENS if wants_tool(body) else len(reply_words(body))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached_tokens(prompt), "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def chunk_base(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "system_fingerprint": "fp_fake",
    }


def chat_completion(body: dict[str, Any], usage: dict[str, Any] | None) -> dict[str, Any]:
    tool = wants_tool(body)
    message: dict[str, Any] = {"role": "assistant", "content": " ".join(reply_words(body))}
    finish = "stop"
    if tool is not None:
        message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(tool)]}
        finish = "tool_calls"
    result = chunk_base(body) | {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        result["usage"] = usage
    return result


def _tool_call(tool: dict[str, Any]) -> dict[str, Any]:
    function = {"name": _tool_name(tool), "arguments": TOOL_ARGUMENTS}
    return {"id": "call_fake", "type": "function", "function": function}


def chat_chunks(body: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    base = chunk_base(body)
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return base | {"choices": [choice]} | extra

    chunks = [chunk({"role": "assistant", "content": ""})]
    tool = wants_tool(body)
    if tool is not None:
        call = _tool_call(tool)
        head = {"index": 0, "id": call["id"], "type": "function"}
        chunks.append(
            chunk(
                {
                    "tool_calls": [
                        head | {"function": {"name": call["function"]["name"], "arguments": ""}}
                    ]
                }
            )
        )
        for part in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        chunks.append(chunk({}, "tool_calls"))
        return chunks
    for i, word in enumerate(reply_words(body)):
        chunks.append(chunk({"content": word if i == 0 else " " + word}))
    chunks.append(chunk({}, "stop"))
    return chunks


def embedding(index: int, encoding: str | None) -> dict[str, Any]:
    vector = [round(0.1 * (index + 1) * (d + 1), 3) for d in range(EMBEDDING_DIMENSIONS)]
    value: Any = vector
    if encoding == "base64":
        value = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return {"object": "embedding", "index": index, "embedding": value}


def anthropic_usage(body: dict[str, Any]) -> dict[str, Any]:
    total = prompt_tokens(body)
    read = cached_tokens(total)
    creation = total // 4
    output = TOOL_OUTPUT_TOKENS if wants_tool(body) else len(reply_words(body))
    return {
        "input_tokens": total - read - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "output_tokens": output,
    }


def anthropic_message(body: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    tool = wants_tool(body)
    content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(reply_words(body))}]
    stop = "end_turn"
    if tool is not None:
        content = [
            {
                "type": "tool_use",
                "id": "toolu_fake",
                "name": _tool_name(tool),
                "input": json.loads(TOOL_ARGUMENTS),
            }
        ]
        stop = "tool_use"
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model"),
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": dict(usage),
    }


def anthropic_events(
    body: dict[str, Any], usage: dict[str, Any], *, no_usage: bool
) -> list[dict[str, Any]]:
    message = anthropic_message(body, usage)
    blocks = message.pop("content")
    # As the API does: message_start carries input usage and a provisional output count.
    message["usage"] = dict(usage) | {"output_tokens": 1}
    message["content"] = []
    message["stop_reason"] = None
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    if no_usage:
        del message["usage"]
    block = blocks[0]
    if block["type"] == "tool_use":
        events.append(
            {"type": "content_block_start", "index": 0, "content_block": block | {"input": {}}}
        )
        events.append({"type": "ping"})
        for part in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
            )
        stop = "tool_use"
    else:
        events.append(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
        events.append({"type": "ping"})
        for i, word in enumerate(block["text"].split()):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                }
            )
        stop = "end_turn"
    events.append({"type": "content_block_stop", "index": 0})
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if not no_usage:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
    events.append(delta)
    events.append({"type": "message_stop"})
    return events
