"""How a conversation becomes the token ids a model continues, and where its reply ends.

A model whose tokenizer is chat_tokens' "gpt2-chat-v1" (fine-tuned on conversation data made
by `prepare_datasets.py --conversations`) is prompted in that format: the conversation in its
special tokens, then <|assistant_start|>; its reply ends at <|assistant_end|> (or the document
token). Every other model (base models have no chat tokens) gets plain text:

    System: Be brief.          (only when there is a system message)
    User: Hello
    Assistant: Hi there.
    User: What is 2 + 2?
    Assistant: <- the model continues from here

and its reply ends at its next "\\nUser:" or at the document token (<|endoftext|>).
"""

from dataclasses import dataclass

import chat_tokens

ROLE_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
TURN_END = "\nUser:"  # what a base model writes once the assistant's reply is over


@dataclass(frozen=True)
class ChatPrompt:
    token_ids: list
    stop_ids: tuple  # tokens that end the assistant's reply
    stop_texts: tuple  # text that ends it (not part of the reply)


def render_chat(messages, tokenizer):
    """The prompt for the assistant's next reply to `messages` ([{"role", "content"}], roles
    as in ROLE_LABELS, a system message only first), in the tokenizer's format (above)."""
    if tokenizer.name == chat_tokens.ENCODING_NAME:
        return ChatPrompt(chat_tokens.render_prompt(messages), chat_tokens.reply_end_ids(), ())
    lines = [f"{ROLE_LABELS[message['role']]}: {message['content']}" for message in messages]
    text = "\n".join(lines + [f"{ROLE_LABELS['assistant']}: "])
    return ChatPrompt(tokenizer.encode(text), (tokenizer.eot_id,), (TURN_END,))
