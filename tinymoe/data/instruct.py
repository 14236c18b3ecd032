"""Instruction examples: JSONL records with `prompt`/`completion` or chat `messages`, rendered as text.

One template renders both kinds, so a prompt/completion pair and the two-message chat that says
the same thing become the same text:

    System: <content>            a system message            (prompt)
    User: <content>              a user message, or `prompt`  (prompt)
    Assistant: <content>         an assistant message, or `completion`: "Assistant: " is prompt,
                                 the content and its newline are the target

Each line ends with a newline. The result is a list of (text, is_target) segments; the token cache
(tinymoe.data.tokens) encodes each segment on its own, so the target mask lines up with token
boundaries exactly. A record with a `text` field is an ordinary document whatever else it holds.
"""

from __future__ import annotations

from tinymoe.errors import TinyMoeError
from tinymoe.text_input import clean_text

ROLES = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def is_instruction(record: dict) -> bool:
    return "messages" in record or "prompt" in record or "completion" in record


def _string(record: dict, key: str, where: str) -> str:
    if key not in record:
        other = "completion" if key == "prompt" else "prompt"
        raise TinyMoeError(f"{where}: record has '{other}' but no '{key}'")
    if not isinstance(record[key], str):
        raise TinyMoeError(f"{where}: field '{key}' is not a string")
    return clean_text(record[key])


def _target(text: str, where: str, what: str) -> str:
    if not text.strip():
        raise TinyMoeError(f"{where}: {what} is empty: an example needs a target to learn")
    return text


def render(record: dict, where: str) -> list[tuple[str, bool]]:
    """(text, is_target) segments of an instruction record, in order."""
    if "messages" in record:
        return _render_messages(record["messages"], where)
    prompt = _string(record, "prompt", where)
    completion = _target(_string(record, "completion", where), where, "'completion'")
    return [(f"{ROLES['user']}{prompt}\n{ROLES['assistant']}", False), (f"{completion}\n", True)]


def _render_messages(messages, where: str) -> list[tuple[str, bool]]:
    if not isinstance(messages, list) or not messages:
        raise TinyMoeError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    segments, prompt = [], ""
    for i, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise TinyMoeError(f"{where}: message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise TinyMoeError(f"{where}: message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise TinyMoeError(f"{where}: message {i} has no string 'content'")
        content = clean_text(content)
        if role == "assistant":
            segments.append((prompt + ROLES[role], False))
            segments.append((_target(content, where, f"message {i} (assistant)") + "\n", True))
            prompt = ""
        else:
            prompt += f"{ROLES[role]}{content}\n"
    if not any(is_target for _, is_target in segments):
        raise TinyMoeError(f"{where}: no assistant message: an example needs a target to learn")
    if prompt:  # trailing user/system turns after the last answer: context for nothing, kept as prompt
        segments.append((prompt, False))
    return [(text, is_target) for text, is_target in segments if text]
