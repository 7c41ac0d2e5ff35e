"""Multi-turn prompts: each turn sees the earlier turns and the model's answers to them.

With a chat template the history is a list of messages rendered by the template. A model without
one (a base model such as stories260K) gets the turns and answers joined as plain text, separated
by blank lines: ``turn 1 \\n\\n answer 1 \\n\\n turn 2``.

The prompt is encoded once, to token ids, and every method receives those same ids.
"""

from __future__ import annotations

PLAIN_SEPARATOR = "\n\n"


class Conversation:
    def __init__(self, tokenizer):
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.messages: list[dict[str, str]] = []

    def ask(self, turn: str) -> str | list[dict[str, str]]:
        """Add a user turn; return the prompt for ``Engine.encode``."""
        self.messages.append({"role": "user", "content": turn})
        if self.chat:
            return [dict(m) for m in self.messages]
        return PLAIN_SEPARATOR.join(m["content"] for m in self.messages)

    def answer(self, text: str) -> None:
        """Record the model's answer to the last turn (the next turn sees it)."""
        self.messages.append({"role": "assistant", "content": text})
