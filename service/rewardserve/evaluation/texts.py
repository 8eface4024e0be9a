"""What the length figures measure of an HH conversation ("\\n\\nHuman: ...\\n\\nAssistant:
..."): its response is the final Assistant turn, its prompt everything before it."""

from __future__ import annotations

ASSISTANT = "\n\nAssistant:"


def split_response(conversation: str) -> tuple[str, str]:
    """(prompt, response). A text without an Assistant turn is all response (so a file in
    another format still gets a length, of the whole text)."""
    at = conversation.rfind(ASSISTANT)
    if at < 0:
        return "", conversation.strip()
    return conversation[:at], conversation[at + len(ASSISTANT) :].strip()


def response(conversation: str) -> str:
    return split_response(conversation)[1]


def prompt(conversation: str) -> str:
    return split_response(conversation)[0]


def words(text: str) -> int:
    return len(text.split())
