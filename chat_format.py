"""How a conversation becomes the token ids a model continues, and where its reply ends.

The format today is plain text, for every model (base models have no chat tokens):

    System: Be brief.          (only when there is a system message)
    User: Hello
    Assistant: Hi there.
    User: What is 2 + 2?
    Assistant: <- the model continues from here

The reply ends at the model's next "\\nUser:" or at the document token (<|endoftext|>).
This changes when the chat tokens of issue 24 item 2 (beginning of conversation,
user/assistant start and end) are added to the encoding: `render_chat` is the one place
that will then render them, and `ChatPrompt.stop_ids` will hold the assistant's end token.
"""

from dataclasses import dataclass

ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\nUser:"  # what a base model writes once the assistant's reply is over


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list
    stop_ids: tuple  # tokens that end the assistant's reply
    stop_texts: tuple  # text that ends it (not part of the reply)


def render_chat(messages, tokenizer):
    """The prompt for the assistant's next reply to `messages` ([{"role", "content"}], roles
    as in ROLE_LABELS), rendered in the plain-text format above."""
    lines = [f"{ROLE_LABELS[message['role']]}: {message['content']}" for message in messages]
    text = "\n".join(lines + [f"{ROLE_LABELS['assistant']}: "])
    return ChatPrompt(tokenizer.encode(text), (tokenizer.eot_id,), (TURN_END,))
