"""The chat format: GPT-2's tokenizer plus chat special tokens, and conversations rendered as
token ids with a loss mask.

Tokenizer "gpt2-chat-v1" is tiktoken's `gpt2` encoding with the special tokens below added
after its last id (50256, end-of-text), the way tiktoken's README extends an encoding
(tiktoken.Encoding with `special_tokens` extended). A new or reordered token is a new
version ("gpt2-chat-v2"), never a change to v1: datasets and models record the name.

A conversation renders as

    <|conversation_start|>
    <|system_start|> text <|system_end|>            (optional, first message only)
    <|user_start|> text <|user_end|>
    <|assistant_start|> text <|assistant_end|>      (user and assistant turns, any number)

with the loss mask 1 on the assistant's text and its <|assistant_end|> (what the model must
learn to write, and to stop), 0 elsewhere (<|assistant_start|> included: the prompt gives it).
Message text is encoded as ordinary text: a literal "<|user_end|>" in a message is not one.

chat.py / serve.py prompt the model with `render_prompt(messages)` and stop at
`reply_end_ids()` (<|assistant_end|>, or end-of-text).
"""

from dataclasses import dataclass

from errors import UserError

ENCODING_NAME = "gpt2-chat-v1"
BASE_ENCODING = "gpt2"
CONVERSATION_START = "<|conversation_start|>"
# The special tokens in id order, from 50257 on (GPT-2's own end-of-text stays 50256).
CHAT_SPECIAL_TOKENS = (CONVERSATION_START, "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                       "<|assistant_start|>", "<|assistant_end|>")
FIRST_CHAT_ID = 50257
ROLES = ("system", "user", "assistant")


def special_token_ids():
    """{special token: id} of the chat tokens."""
    return {token: FIRST_CHAT_ID + i for i, token in enumerate(CHAT_SPECIAL_TOKENS)}


def encoding():
    """tiktoken's gpt2 with the chat tokens added (vocabulary 50,264)."""
    import tiktoken

    gpt2 = tiktoken.get_encoding(BASE_ENCODING)
    return tiktoken.Encoding(name=ENCODING_NAME, pat_str=gpt2._pat_str, mergeable_ranks=gpt2._mergeable_ranks,
                             special_tokens={**gpt2._special_tokens, **special_token_ids()})


@dataclass(frozen=True)
class Renderer:
    """Renders conversations with one tiktoken encoding (made once: building it takes a while)."""
    encoding: object

    def token_id(self, token):
        return self.encoding.encode_single_token(token)

    def role_tokens(self, role):
        return self.token_id(f"<|{role}_start|>"), self.token_id(f"<|{role}_end|>")

    def render_conversation(self, messages, where="conversation"):
        """(ids, mask) of a conversation, as lists of ints; `where` names it in errors."""
        check_messages(messages, where)
        ids, mask = [self.token_id(CONVERSATION_START)], [0]
        for message in messages:
            start, end = self.role_tokens(message["role"])
            text = self.encoding.encode_ordinary(message["content"])
            learned = 1 if message["role"] == "assistant" else 0
            ids += [start, *text, end]
            mask += [0] + [learned] * (len(text) + 1)
        return ids, mask

    def render_prompt(self, messages, where="conversation"):
        """The ids that prompt the model for the next assistant reply: the conversation so far
        (ending with a user message) and <|assistant_start|>."""
        ids, _ = self.render_conversation(messages, where)
        return ids + [self.token_id("<|assistant_start|>")]

    def reply_end_ids(self):
        """The ids that end an assistant's reply: <|assistant_end|>, and end-of-text."""
        return self.token_id("<|assistant_end|>"), self.encoding.eot_token


_renderer = None


def renderer():
    global _renderer
    if _renderer is None:
        _renderer = Renderer(encoding())
    return _renderer


def render_conversation(messages, where="conversation"):
    return renderer().render_conversation(messages, where)


def render_prompt(messages, where="conversation"):
    return renderer().render_prompt(messages, where)


def reply_end_ids():
    return renderer().reply_end_ids()


def check_messages(messages, where):
    """Refuse what is not a list of {"role": system|user|assistant, "content": text}, with a
    system message only first."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else message
            raise UserError(f"{where}: messages[{index}] has role {role!r}; valid: {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise UserError(f"{where}: messages[{index}] has no text 'content'")
        if message["role"] == "system" and index > 0:
            raise UserError(f"{where}: messages[{index}] is a system message; only the first may be")
