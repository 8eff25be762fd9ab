"""Conversation data: the gpt2-chat-v1 encoding (GPT-2 plus chat tokens), conversations rendered
with a loss mask, and prepare_datasets.py --conversations on the Alpaca-style instruction data
(converted to messages here), checked against tiktoken's own gpt2 encoding and the format's
token ids; a model too small for the chat vocabulary is one error line."""

import json

import pytest
import tiktoken
from click.testing import CliRunner
from safetensors.numpy import load_file

import chat_tokens
import prepare_datasets
from conftest import SHARED_DATA, TINY_MODEL, make_run, read_rows, run_training
from errors import UserError
from token_data import is_validation_document

GPT2 = tiktoken.get_encoding("gpt2")
# The format's ids (chat_tokens' docstring): after GPT-2's 50,257.
CONVERSATION_START, SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = range(50257, 50264)
END_OF_TEXT = 50256
CONTEXT = 40  # some of the conversations below are longer


def test_chat_encoding_is_gpt2_plus_the_chat_tokens():
    encoding = chat_tokens.encoding()
    assert encoding.n_vocab == 50264 and encoding.eot_token == END_OF_TEXT
    text = "Hello <|user_end|> world, 1234 ünïcode"
    assert encoding.encode_ordinary(text) == GPT2.encode_ordinary(text)
    assert [encoding.decode([i]) for i in range(50257, 50264)] == [
        "<|conversation_start|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
        "<|assistant_start|>", "<|assistant_end|>"]


def test_a_conversation_renders_with_the_assistant_masked_in():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi <|user_end|>"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    ids, mask = chat_tokens.render_conversation(messages)
    e = GPT2.encode_ordinary
    expected = ([(CONVERSATION_START, 0), (SYSTEM_START, 0)] + [(t, 0) for t in e("Be brief.")] + [(SYSTEM_END, 0)]
                + [(USER_START, 0)] + [(t, 0) for t in e("Hi <|user_end|>")] + [(USER_END, 0)]
                + [(ASSISTANT_START, 0)] + [(t, 1) for t in e("Hello.")] + [(ASSISTANT_END, 1)]
                + [(USER_START, 0)] + [(t, 0) for t in e("2+2?")] + [(USER_END, 0)]
                + [(ASSISTANT_START, 0)] + [(t, 1) for t in e("4")] + [(ASSISTANT_END, 1)])
    assert list(zip(ids, mask)) == expected
    assert chat_tokens.render_prompt(messages[:2]) == [CONVERSATION_START, SYSTEM_START, *e("Be brief."), SYSTEM_END,
                                                      USER_START, *e("Hi <|user_end|>"), USER_END, ASSISTANT_START]
    assert chat_tokens.reply_end_ids() == (ASSISTANT_END, END_OF_TEXT)


@pytest.mark.parametrize("messages, says", [
    ([{"role": "bot", "content": "x"}], "messages[0] has role 'bot'; valid: system, user, assistant"),
    ([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}], "messages[1] is a system message"),
    ([{"role": "user", "content": 3}], "messages[0] has no text 'content'"),
    ([], "'messages' must be a non-empty list"),
])
def test_bad_messages_are_refused(messages, says):
    with pytest.raises(UserError, match=f"^here: {says}".replace("[", r"\[").replace("]", r"\]")):
        chat_tokens.render_conversation(messages, "here")


def alpaca_conversations(count):
    """The first `count` entries of the instruction data, as user/assistant messages."""
    entries = json.loads((SHARED_DATA / "instruction-data.json").read_text())[:count]
    return [[{"role": "user", "content": e["instruction"] + (f"\n\n{e['input']}" if e["input"] else "")},
             {"role": "assistant", "content": e["output"]}] for e in entries]


def expected_split(conversations, split, validation_fraction):
    """A split's tokens and mask as the format defines them, built with tiktoken's gpt2."""
    tokens, mask, long = [], [], 0
    for index, (user, assistant) in enumerate(conversations):
        if is_validation_document(index, validation_fraction) != (split == "validation"):
            continue
        prompt = [CONVERSATION_START, USER_START, *GPT2.encode_ordinary(user["content"]), USER_END, ASSISTANT_START]
        reply = [*GPT2.encode_ordinary(assistant["content"]), ASSISTANT_END]
        tokens += prompt + reply + [END_OF_TEXT]
        mask += [0] * len(prompt) + [1] * len(reply) + [0]
        long += len(prompt) + len(reply) > CONTEXT
    return tokens, mask, long


@pytest.fixture(scope="module")
def conversation_dataset(tmp_path_factory):
    directory = tmp_path_factory.mktemp("conversations")
    conversations = alpaca_conversations(150)
    source = directory / "alpaca.jsonl"
    source.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in conversations))
    result = CliRunner().invoke(prepare_datasets.main, [
        str(directory / "chat"), str(source), "--conversations", "--context-length", str(CONTEXT), "--workers", "1",
        "--validation-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    return directory / "chat", conversations, result.output


def test_prepare_writes_packed_tokens_and_the_assistant_mask(conversation_dataset):
    dataset_dir, conversations, output = conversation_dataset
    meta = json.loads((dataset_dir / "meta.json").read_text())
    assert meta["tokenizer"] == "gpt2-chat-v1" and meta["vocab_size"] == 50264 and meta["loss_mask"] is True
    assert meta["special_tokens"] == {"<|conversation_start|>": 50257, "<|system_start|>": 50258,
                                      "<|system_end|>": 50259, "<|user_start|>": 50260, "<|user_end|>": 50261,
                                      "<|assistant_start|>": 50262, "<|assistant_end|>": 50263}
    long = {}
    for split in ("train", "validation"):
        stored = load_file(dataset_dir / f"{split}.safetensors")
        tokens, mask, long[split] = expected_split(conversations, split, 0.1)
        assert stored["tokens"].tolist() == tokens  # packed: documents back to back, no padding
        assert stored["loss_mask"].tolist() == mask
    assert long["train"] > 0  # some are longer than the context: counted, kept whole in the stream
    assert meta["conversations_longer_than_context"] == long
    assert (f"conversations longer than the context ({CONTEXT} tokens), split across training windows, not dropped: "
            f"train {long['train']}, validation {long['validation']}") in output


def test_a_bad_conversation_line_is_one_error(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n"
                      + json.dumps({"messages": [{"role": "human", "content": "x"}]}) + "\n")
    result = CliRunner().invoke(prepare_datasets.main, [str(tmp_path / "out"), str(source), "--conversations",
                                                        "--workers", "1"])
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert errors == [f"error: {source}:2: messages[0] has role 'human'; valid: system, user, assistant"]


def test_the_model_vocabulary_must_cover_the_chat_tokens_and_then_trains(tmp_path, conversation_dataset):
    dataset_dir = conversation_dataset[0]
    small = make_run(tmp_path / "small", dataset_dir, min_train_tokens=128)
    result = run_training([small, tmp_path / "datasets"], check=False)
    assert result.returncode == 2
    assert (f"{small / 'model.json'}: key 'vocab_size' (257) is smaller than the dataset's tokenizer vocabulary "
            "(gpt2-chat-v1: 50264); it must be at least 50264") in result.stderr
    sft = make_run(tmp_path / "sft", dataset_dir, model={**TINY_MODEL, "vocab_size": 50264}, min_train_tokens=256,
                   validation_interval=1, validation_batches=1)
    run_training([sft, tmp_path / "datasets"])
    rows = read_rows(sft)
    assert len(rows) == 2 and all(9 < row["loss"] < 12 and 9 < row["val_loss"] < 12 for row in rows)
