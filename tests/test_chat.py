"""chat.py, generation.TextStream and top-p sampling, against plain loops (chatkit.py)."""

import json

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from chatkit import CHAT_MODEL, GPT2, plain_gpt_of, plain_reply
from evalkit import one_torch_thread  # noqa: F401  (autouse fixture)
from evalkit import assert_one_error_line, random_model, run_script, save_state, tiny_config, write_model

import chat
from config import ModelConfig
from generation import Sampling, TextStream
from gpt import generate
from plain_gpt import PlainGPT
from token_data import ByteTokenizer, get_tokenizer


def chat_transcript(model_json, weights, lines, *options):
    result = CliRunner().invoke(chat.main, [str(model_json), str(weights), *options],
                                input="".join(line + "\n" for line in lines))
    assert result.exit_code == 0, result.output + str(result.exception)
    return result.stdout


def test_chat_streams_greedy_replies_keeps_the_conversation_and_resets(tmp_path):
    cfg = {**CHAT_MODEL, "context_length": 128}
    model_json, weights, model = write_model(tmp_path, cfg, seed=3)
    first_prompt = "User: Hello\nAssistant: "
    first, _, _ = plain_reply(model, first_prompt, 6, stop_text="\nUser:")
    # The second turn sees the first; after /reset, the same message gets the first reply again.
    second, _, _ = plain_reply(model, f"{first_prompt}{first}\nUser: Hello\nAssistant: ", 6, stop_text="\nUser:")
    assert second != first  # else this test could not tell a kept conversation from a reset one

    out = chat_transcript(model_json, weights, ["Hello", "Hello", "/reset", "Hello", "/quit", "never read"],
                          "--temperature", "0", "--max-new-tokens", "6")
    assert out == f"> {first}\n> {second}\n> > {first}\n> "


def test_chat_leaves_out_the_oldest_turns_that_no_longer_fit(tmp_path):
    model_json, weights, model = write_model(tmp_path, CHAT_MODEL)
    long_message = " ".join(["word"] * 50)
    out = chat_transcript(model_json, weights, [long_message, "Hi", "word " * 80],
                          "--temperature", "0", "--max-new-tokens", "4")
    first, _, _ = plain_reply(model, f"User: {long_message}\nAssistant: ", 4, stop_text="\nUser:")
    whole_history = f"User: {long_message}\nAssistant: {first}\nUser: Hi\nAssistant: "
    assert len(GPT2.encode(whole_history)) >= CHAT_MODEL["context_length"]
    # So the second turn's prompt holds the first reply and "Hi" only.
    second, _, _ = plain_reply(model, f"Assistant: {first}\nUser: Hi\nAssistant: ", 4, stop_text="\nUser:")
    assert out == f"> {first}\n> {second}\n> > "  # the third message fits no context: no reply


def test_chat_names_a_run_and_checkpoint_and_takes_the_runs_tokenizer(tmp_path, verdict_dataset):
    """RUN CHECKPOINT as every script takes it: a byte-level run's `latest`, written as training
    writes one (the config in meta.json, the dataset in train.json, which gives the tokenizer);
    the reply is PlainGPT's with the checkpoint's weights."""
    run_dir = tmp_path / "runs" / "tiny"
    checkpoint_dir = run_dir / "checkpoints" / "tiny-iteration-2"
    cfg = tiny_config(drop_rate=0.0)
    _, _, model = write_model(checkpoint_dir, cfg, seed=6)
    (checkpoint_dir / "model.json").rename(run_dir / "model.json")
    (checkpoint_dir / "meta.json").write_text(json.dumps({"model_config": cfg, "step": 2}))
    (run_dir / "checkpoints" / "latest").symlink_to(checkpoint_dir.name)
    (run_dir / "train.json").write_text(json.dumps({"dataset": str(verdict_dataset)}))
    plain = PlainGPT(ModelConfig.from_dict(cfg)).eval()
    plain.load_state_dict(load_file(checkpoint_dir / "model.safetensors"))
    ids = list(b"User: Hi\nAssistant: ")
    reply = []
    with torch.no_grad():
        for _ in range(6):
            reply.append(int(plain(torch.tensor([ids + reply]))[0, -1].argmax()))
    expected = bytes(reply[:reply.index(256)] if 256 in reply else reply).decode("utf-8", errors="replace")
    expected = expected.split("\nUser:")[0]
    result = CliRunner().invoke(chat.main, [str(run_dir), "latest", "--temperature", "0", "--max-new-tokens", "6",
                                            "--datasets-dir", str(tmp_path / "datasets")], input="Hi\n")
    assert result.exit_code == 0, result.output + str(result.exception)
    assert result.stdout == f"> {expected}\n> " and "tokenizer: bytes" in result.stderr


def test_chat_refuses_a_missing_model(tmp_path):
    assert_one_error_line(run_script("chat.py", tmp_path / "no-such-run"), "no-such-run")


def test_text_stream_ends_at_a_stop_text_without_sending_any_of_it(tmp_path):
    model = random_model(CHAT_MODEL)
    prompt = "Every effort moves you"
    whole, _, _ = plain_reply(model, prompt, 12)
    stop_text = whole[-6:-2]
    assert whole.index(stop_text) == len(whole) - 6  # the reply's first match is where it is cut
    stream = TextStream(model, get_tokenizer("gpt2"), GPT2.encode(prompt), 12, Sampling(), stop_texts=[stop_text])
    pieces = list(stream)
    assert "".join(pieces) == whole[:-6] == stream.text and stream.finish_reason == "stop"
    assert len(pieces) > 1  # streamed, not sent at the end


def test_text_stream_holds_back_incomplete_characters():
    """A byte-level model: a character's bytes arrive one token at a time, and no piece may end
    in a half character (decoded as U+FFFD) that the next token completes."""
    model = random_model(tiny_config(), seed=1)
    prompt_ids = list("Zürich".encode())
    stream = TextStream(model, ByteTokenizer(), prompt_ids, 40, Sampling(temperature=1.0, seed=5), stop_ids=[256])
    pieces = list(stream)
    # The tokens, from gpt.generate (test_gpt.py checks it against plain loops).
    new_ids = generate(model, torch.tensor([prompt_ids]), 40, temperature=1.0, eos_id=256,
                       generator=torch.Generator().manual_seed(5))[0, len(prompt_ids):].tolist()
    expected = bytes(new_ids[:-1] if new_ids[-1] == 256 else new_ids)
    assert "".join(pieces) == expected.decode("utf-8", errors="replace")
    assert any(byte >= 0x80 for byte in expected)  # multi-byte characters were generated
    complete_prefixes = {expected[:n].decode("utf-8", errors="replace") for n in range(len(expected) + 1)
                         if not expected[:n].decode("utf-8", errors="replace").endswith("\ufffd")}
    sent = ""
    for piece in pieces[:-1]:
        sent += piece
        assert sent in complete_prefixes


def test_top_p_draws_only_from_the_nucleus():
    model = random_model(tiny_config(), seed=2)
    prompt = torch.tensor([list(b"The ")])
    probs = torch.softmax(plain_gpt_of(model)(prompt)[0, -1] / 2.0, dim=-1)
    ordered = probs.argsort(descending=True).tolist()
    # The fewest most likely tokens whose probabilities reach 0.5, counted by hand.
    nucleus, mass = set(), 0.0
    for token in ordered:
        nucleus.add(token)
        mass += probs[token].item()
        if mass >= 0.5:
            break
    generator = torch.Generator().manual_seed(0)
    draws = {generate(model, prompt, 1, temperature=2.0, top_p=0.5, generator=generator)[0, -1].item()
             for _ in range(100)}
    assert draws <= nucleus and len(draws) > 1
    # top_p 0 keeps only the most likely token: greedy at any temperature.
    assert generate(model, prompt, 1, temperature=2.0, top_p=0.0)[0, -1].item() == ordered[0]


# gpt2-chat-v1's special tokens, written out here as chat_tokens.py documents them (ids after
# GPT-2's 50,256): the prompt below is built from these numbers, not by chat_tokens.
CONVERSATION_START, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END = 50257, 50260, 50261, 50262, 50263
CHAT_TOKENS_MODEL = {**CHAT_MODEL, "vocab_size": 50264}


def test_a_chat_tokens_model_is_prompted_in_its_special_tokens(tmp_path):
    """A model fine-tuned on gpt2-chat-v1 conversations: chat.py prompts it with the special
    tokens and <|assistant_start|>; its greedy reply is PlainGPT's on those ids."""
    model_json, weights, model = write_model(tmp_path, CHAT_TOKENS_MODEL, seed=4)
    plain = plain_gpt_of(model)
    ids = [CONVERSATION_START, USER_START, *GPT2.encode("Hello"), USER_END, ASSISTANT_START]
    reply = []
    with torch.no_grad():
        while len(reply) < 6 and (not reply or reply[-1] not in (ASSISTANT_END, GPT2.eot_token)):
            reply.append(int(plain(torch.tensor([ids + reply]))[0, -1].argmax()))
    assert all(token < CONVERSATION_START for token in reply)  # ordinary text, so GPT-2 decodes it
    out = chat_transcript(model_json, weights, ["Hello"], "--tokenizer", "gpt2-chat-v1", "--temperature", "0",
                          "--max-new-tokens", "6")
    assert out == f"> {GPT2.decode(reply)}\n> "


def test_a_chat_tokens_reply_ends_at_assistant_end(tmp_path):
    """A model that always writes <|assistant_end|> (every final-norm output sums to its
    shift, and only that token's head row reads the shift) gives empty replies: the token
    ends the reply and is not shown."""
    model_json, weights, model = write_model(tmp_path, CHAT_TOKENS_MODEL, seed=4)
    with torch.no_grad():
        model.final_norm.scale.fill_(1.0)
        model.final_norm.shift.fill_(1.0)
        model.out_head.weight.zero_()
        model.out_head.weight[ASSISTANT_END] = 1.0
    save_state(model.state_dict(), weights)
    out = chat_transcript(model_json, weights, ["Hello", "Again"], "--tokenizer", "gpt2-chat-v1",
                          "--temperature", "0", "--max-new-tokens", "6")
    assert out == "> \n> \n> "


def test_a_system_message_after_the_first_is_refused_by_the_server():
    import serve

    messages = [{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}]
    with pytest.raises(serve.RequestError) as refused:
        serve.chat_messages({"messages": messages})
    assert refused.value.param == "messages[1]" and "system" in str(refused.value)


def test_a_mixture_runs_tokenizer_is_its_chat_sources(tmp_path):
    """Evaluation tools pick a mixture run's tokenizer from its sources' meta.json: the one
    with the most tokens (a chat source's, whose special tokens extend GPT-2's)."""
    from eval_common import tokenizer_name_for
    from model_source import from_model_json
    from token_data import write_meta

    for name, tokenizer in (("web", "gpt2"), ("chat", "gpt2-chat-v1")):
        (tmp_path / "datasets" / name).mkdir(parents=True)
        write_meta(tmp_path / "datasets" / name, get_tokenizer(tokenizer))
    model_json, weights, _ = write_model(tmp_path / "run", CHAT_TOKENS_MODEL)
    (tmp_path / "run" / "train.json").write_text(json.dumps({"dataset": [
        {"dataset": str(tmp_path / "datasets" / "web"), "weight": 0.7},
        {"dataset": str(tmp_path / "datasets" / "chat"), "weight": 0.3}]}))
    name, reason = tokenizer_name_for(from_model_json(model_json, weights), tmp_path / "datasets")
    assert name == "gpt2-chat-v1" and str(tmp_path / "datasets" / "chat") in reason
