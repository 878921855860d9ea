"""What the fake upstream answers: deterministic bodies, SSE events and usage (pure).

Token counts derive from the request so a test can compute them: :func:`prompt_tokens`
(3 + per message 4 + words, 10 per tool), half of it "read from the cache"; the reply is
:data:`REPLY` cut to ``max_tokens`` words, one output token a word (a tool call: 12). With
tools offered, the model calls the first one, and answers in text once the last message
(or input item) is a tool's result, so an agent loop ends.
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


VERBOSE = "_fake_verbose"
"""Set (by the upstream's ``verbose`` fault) on the body the answer is built from: the
reply then runs to its full ceiling, :data:`REPLY` repeated."""


def reply_words(body: dict[str, Any]) -> list[str]:
    limit = max(1, int(body.get("max_tokens") or body.get("max_completion_tokens") or 1000))
    words = REPLY.split()
    if body.get(VERBOSE):
        words = words * (limit // len(words) + 1)
    return words[:limit]


def _answers_a_tool_result(body: dict[str, Any]) -> bool:
    """The last message carries a tool's result (OpenAI role ``tool``, Anthropic a
    ``tool_result`` block): the model then answers in text, as an agent loop expects."""
    messages = body.get("messages") or []
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict):
        return False
    if last.get("role") == "tool":
        return True
    content = last.get("content")
    return isinstance(content, list) and any(
        isinstance(b, dict) and b.get("type") == "tool_result" for b in content
    )


def wants_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first tool offered, unless tool_choice says none or the last message is a
    tool's result."""
    tools = body.get("tools") or []
    if not tools or body.get("tool_choice") in ("none", {"type": "none"}):
        return None
    if _answers_a_tool_result(body):
        return None
    tool: dict[str, Any] = tools[0]
    return tool


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


OPENAI_TIERS = ("default", "flex", "priority")


def served_tier(body: dict[str, Any]) -> str:
    """The tier OpenAI reports it served a call at: the one asked for (flex, priority,
    default), else default (``auto`` in a project whose default tier is default)."""
    asked = body.get("service_tier")
    return asked if asked in OPENAI_TIERS else "default"


def chunk_base(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model"),
        "service_tier": served_tier(body),
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


def anthropic_server_tool(body: dict[str, Any]) -> bool:
    """The first tool offered is Anthropic's server web search (``web_search_2025…``):
    the model searches once (billed per use) and answers in text."""
    tool = wants_tool(body)
    return tool is not None and str(tool.get("type", "")).startswith("web_search_")


def one_hour_cache(body: Any) -> bool:
    """Whether a cache breakpoint of the request asks for the 1-hour lifetime."""
    if isinstance(body, dict):
        control = body.get("cache_control")
        if isinstance(control, dict) and control.get("ttl") == "1h":
            return True
        return any(one_hour_cache(v) for v in body.values())
    if isinstance(body, list):
        return any(one_hour_cache(v) for v in body)
    return False


def anthropic_usage(body: dict[str, Any]) -> dict[str, Any]:
    """A quarter of the prompt is written to the cache: to the 1-hour cache when a
    breakpoint asks for it (``cache_control.ttl: 1h``), else to the 5-minute one."""
    total = prompt_tokens(body)
    read = cached_tokens(total)
    creation = total // 4
    one_hour = creation if one_hour_cache(body) else 0
    server = anthropic_server_tool(body)
    tool = wants_tool(body) is not None and not server
    output = TOOL_OUTPUT_TOKENS if tool else len(reply_words(body))
    usage: dict[str, Any] = {
        "input_tokens": total - read - creation,
        "cache_creation_input_tokens": creation,
        "cache_read_input_tokens": read,
        "cache_creation": {
            "ephemeral_5m_input_tokens": creation - one_hour,
            "ephemeral_1h_input_tokens": one_hour,
        },
        "output_tokens": output,
        "service_tier": "standard",
    }
    if server:
        usage["server_tool_use"] = {"web_search_requests": 1}
    return usage


def _anthropic_search_blocks() -> list[dict[str, Any]]:
    result = {
        "type": "web_search_result",
        "url": "https://weather.example/paris",
        "title": "Paris weather",
        "encrypted_content": "ZmFrZQ==",
        "page_age": None,
    }
    return [
        {
            "type": "server_tool_use",
            "id": "srvtoolu_fake",
            "name": "web_search",
            "input": {"query": "weather in Paris"},
        },
        {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_fake", "content": [result]},
    ]


def anthropic_message(body: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    server = anthropic_server_tool(body)
    tool = None if server else wants_tool(body)
    content: list[dict[str, Any]] = [{"type": "text", "text": " ".join(reply_words(body))}]
    if server:
        content = _anthropic_search_blocks() + content
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
    message["usage"] = {k: v for k, v in usage.items() if k != "server_tool_use"}
    message["usage"]["output_tokens"] = 1
    message["content"] = []
    message["stop_reason"] = None
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    if no_usage:
        del message["usage"]
    index = 0
    while blocks[0]["type"] in ("server_tool_use", "web_search_tool_result"):
        events.extend(_server_block_events(index, blocks.pop(0)))
        index += 1
    block = blocks[0]
    if block["type"] == "tool_use":
        events.append(
            {"type": "content_block_start", "index": index, "content_block": block | {"input": {}}}
        )
        events.append({"type": "ping"})
        for part in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": part},
                }
            )
        stop = "tool_use"
    else:
        events.append(
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            }
        )
        events.append({"type": "ping"})
        for i, word in enumerate(block["text"].split()):
            events.append(
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                }
            )
        stop = "end_turn"
    events.append({"type": "content_block_stop", "index": index})
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
    }
    if not no_usage:
        delta["usage"] = {"output_tokens": usage["output_tokens"]}
        if "server_tool_use" in usage:  # cumulative, as the API reports it at the end
            delta["usage"]["server_tool_use"] = usage["server_tool_use"]
    events.append(delta)
    events.append({"type": "message_stop"})
    return events


def _server_block_events(index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
    """A server tool's blocks as the API streams them: the call's input as JSON deltas,
    the result whole."""
    if block["type"] != "server_tool_use":
        return [
            {"type": "content_block_start", "index": index, "content_block": block},
            {"type": "content_block_stop", "index": index},
        ]
    return [
        {"type": "content_block_start", "index": index, "content_block": block | {"input": {}}},
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "input_json_delta", "partial_json": json.dumps(block["input"])},
        },
        {"type": "content_block_stop", "index": index},
    ]


# The Responses API (POST /v1/responses).

BUILTIN_TOOLS = {
    "web_search": "web_search_call",
    "web_search_preview": "web_search_call",
    "file_search": "file_search_call",
    "code_interpreter": "code_interpreter_call",
}
REASONING_TOKENS = 16
"""Reasoning tokens a request with ``reasoning`` spends (part of ``output_tokens``)."""


def responses_prompt_tokens(body: dict[str, Any]) -> int:
    """3 + instructions' words + per input item (4 + words), 10 per tool."""
    total = 3 + count_words(str(body.get("instructions") or ""))
    items = body.get("input")
    if isinstance(items, str):
        total += 4 + count_words(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            text = _text_of(item.get("content")) or str(item.get("output") or "")
            total += 4 + count_words(text)
    return total + 10 * len(body.get("tools") or [])


def responses_tool(body: dict[str, Any]) -> dict[str, Any] | None:
    """The first function or built-in tool offered, unless tool_choice says none or the
    last input item is a tool's output (the model then answers in text)."""
    tools = body.get("tools") or []
    items = body.get("input")
    last = items[-1] if isinstance(items, list) and items else None
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        return None
    if not tools or body.get("tool_choice") == "none":
        return None
    # Tools of other kinds (custom, local_shell, mcp...) have item types of their own;
    # the fake calls the first function or built-in tool offered.
    usable = [
        t
        for t in tools
        if isinstance(t, dict) and (t.get("type") == "function" or t.get("type") in BUILTIN_TOOLS)
    ]
    return usable[0] if usable else None


def responses_words(body: dict[str, Any]) -> tuple[list[str], bool]:
    """The reply's words and whether ``max_output_tokens`` cut it (status incomplete)."""
    words = REPLY.split()
    limit = body.get("max_output_tokens")
    if isinstance(limit, int) and limit < len(words):
        return words[: max(1, limit)], True
    return words, False


def responses_output(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The output items: reasoning (if asked), then a built-in tool call and a message, a
    function call, or a message."""
    items: list[dict[str, Any]] = []
    if body.get("reasoning"):
        items.append({"type": "reasoning", "id": "rs_fake", "summary": []})
    tool = responses_tool(body)
    kind = BUILTIN_TOOLS.get(str(tool.get("type"))) if tool else None
    if tool is not None and kind is None:
        items.append(
            {
                "type": "function_call",
                "id": "fc_fake",
                "call_id": "call_fake",
                "name": _tool_name(tool),
                "arguments": TOOL_ARGUMENTS,
                "status": "completed",
            }
        )
        return items
    if kind == "web_search_call":
        action = {"type": "search", "query": "weather in Paris"}
        items.append({"type": kind, "id": "ws_fake", "status": "completed", "action": action})
    elif kind == "file_search_call":
        items.append(
            {
                "type": kind,
                "id": "fs_fake",
                "status": "completed",
                "queries": ["weather in Paris"],
                "results": None,
            }
        )
    elif kind == "code_interpreter_call":
        items.append(
            {
                "type": kind,
                "id": "ci_fake",
                "status": "completed",
                "code": "print(1)",
                "container_id": "cntr_fake",
                "outputs": None,
            }
        )
    words, _ = responses_words(body)
    text = " ".join(words)
    part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    items.append(
        {
            "type": "message",
            "id": "msg_fake",
            "status": "completed",
            "role": "assistant",
            "content": [part],
        }
    )
    return items


def responses_usage(body: dict[str, Any]) -> dict[str, Any]:
    """Input (half of it cached), output (reply words or a tool call, plus reasoning)."""
    prompt = responses_prompt_tokens(body)
    tool = responses_tool(body)
    function_call = tool is not None and str(tool.get("type")) not in BUILTIN_TOOLS
    reasoning = REASONING_TOKENS if body.get("reasoning") else 0
    words, _ = responses_words(body)
    output = (TOOL_OUTPUT_TOKENS if function_call else len(words)) + reasoning
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached_tokens(prompt)},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


def response_object(
    body: dict[str, Any], response_id: str, usage: dict[str, Any] | None, status: str
) -> dict[str, Any]:
    """A Responses API ``response`` object (status completed, incomplete or failed)."""
    _, cut = responses_words(body)
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": (
            {"code": "server_error", "message": "the fake upstream failed this response"}
            if status == "failed"
            else None
        ),
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": responses_output(body) if status != "failed" else [],
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning") or {"effort": None, "summary": None},
        "service_tier": served_tier(body),
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def responses_events(
    body: dict[str, Any], response_id: str, usage: dict[str, Any] | None, ending: str
) -> list[dict[str, Any]]:
    """The streamed event sequence, as the Responses API sends it, ending in ``ending``
    (``response.completed``, ``response.incomplete`` or ``response.failed``)."""
    status = ending.removeprefix("response.")
    final = response_object(body, response_id, usage, status)
    start = final | {"status": "in_progress", "output": [], "usage": None, "error": None}
    start["incomplete_details"] = None
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": start},
        {"type": "response.in_progress", "response": start},
    ]
    for index, item in enumerate(final["output"]):
        events.extend(_item_events(index, item))
    events.append({"type": ending, "response": final})
    for number, event in enumerate(events):
        event["sequence_number"] = number
    return events


def _item_events(index: int, item: dict[str, Any]) -> list[dict[str, Any]]:
    kind, item_id = item["type"], item["id"]
    where: dict[str, Any] = {"output_index": index, "item_id": item_id}
    added: dict[str, Any] = item | {"status": "in_progress"} if "status" in item else dict(item)
    events: list[dict[str, Any]] = []
    if kind == "message":
        added["content"] = []
        text = item["content"][0]["text"]
        part: dict[str, Any] = {
            "type": "output_text",
            "text": "",
            "annotations": [],
            "logprobs": [],
        }
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        events.append(
            {"type": "response.content_part.added", **where, "content_index": 0, "part": part}
        )
        for i, word in enumerate(text.split()):
            events.append(
                {
                    "type": "response.output_text.delta",
                    **where,
                    "content_index": 0,
                    "delta": word if i == 0 else " " + word,
                    "logprobs": [],
                }
            )
        events.append(
            {
                "type": "response.output_text.done",
                **where,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            }
        )
        events.append(
            {
                "type": "response.content_part.done",
                **where,
                "content_index": 0,
                "part": item["content"][0],
            }
        )
    elif kind == "function_call":
        added["arguments"] = ""
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        for piece in (TOOL_ARGUMENTS[:10], TOOL_ARGUMENTS[10:]):
            events.append(
                {"type": "response.function_call_arguments.delta", **where, "delta": piece}
            )
        events.append(
            {
                "type": "response.function_call_arguments.done",
                **where,
                "arguments": TOOL_ARGUMENTS,
            }
        )
    elif kind.endswith("_call"):
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
        prefix = f"response.{kind}"
        phases = (
            ("in_progress", "searching", "completed")
            if kind != "code_interpreter_call"
            else ("in_progress", "interpreting", "completed")
        )
        events.extend({"type": f"{prefix}.{phase}", **where} for phase in phases)
    else:  # reasoning
        events.append({"type": "response.output_item.added", "output_index": index, "item": added})
    events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    return events
