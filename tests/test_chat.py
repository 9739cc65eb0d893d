"""`align chat`: commands and parameters, the session loop, one `--prompt` turn against transformers' own greedy
decoding, the interactive mode for real in a pseudo-terminal, and refusals before any weights load."""

from __future__ import annotations

import fcntl
import functools
import os
import select
import subprocess
import sys
import termios
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import REPO, align_env

from align.chat import (
    ChatParams,
    ChatUsageError,
    Command,
    Conversation,
    Session,
    format_params,
    parse_command,
    policy_artifact,
    run_session,
    update_params,
)
from align.errors import AlignError, ArtifactError

REF = "tiny-sft@v2"
MESSAGE = "Tell me a story about a cat."
MAX_NEW_TOKENS = 24


# ---- commands and parameters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("line, parsed", [
    ("hello there", "hello there"),
    ("  spaced  ", "spaced"),
    ("//etc is a folder", "/etc is a folder"),
    ("/reset", Command("reset")),
    ("/quit", Command("quit")),
    ("/help", Command("help")),
    ("/system You are terse.", Command("system", "You are terse.")),
    ("/system", Command("system", "")),
    ("/params", Command("params", "")),
    ("/params temperature=0 top_p=0.5", Command("params", "temperature=0 top_p=0.5")),
])
def test_parse_command(line: str, parsed: Command | str) -> None:
    assert parse_command(line) == parsed


@pytest.mark.parametrize("line, fragment", [
    ("/rest", "unknown command '/rest'"),
    ("/reset now", "/reset takes no argument"),
    ("/quit please", "/quit takes no argument"),
])
def test_parse_command_refuses_mistyped_commands(line: str, fragment: str) -> None:
    with pytest.raises(ChatUsageError, match=fragment):
        parse_command(line)


def test_update_params_applies_valid_pairs() -> None:
    params = update_params(ChatParams(), "temperature=0 top_p=0.9 max_new_tokens=128 seed=-3")
    assert params == ChatParams(temperature=0.0, top_p=0.9, max_new_tokens=128, seed=-3)
    assert format_params(params) == "temperature=0.0 top_p=0.9 max_new_tokens=128 seed=-3"
    assert update_params(params, "") == params


@pytest.mark.parametrize("text, fragment", [
    ("temprature=1", "unknown parameter 'temprature'; known: temperature, top_p, max_new_tokens, seed"),
    ("temperature", "write key=value"),
    ("temperature=warm", "temperature must be a number >= 0 (0: greedy), not 'warm'"),
    ("temperature=-1", "temperature must be"),
    ("temperature=nan", "temperature must be"),
    ("temperature=inf", "temperature must be"),
    ("top_p=0", "top_p must be a number in (0, 1]"),
    ("top_p=1.5", "top_p must be"),
    ("max_new_tokens=0", "max_new_tokens must be a whole number >= 1"),
    ("max_new_tokens=2.5", "max_new_tokens must be"),
    ("seed=x", "seed must be a whole number"),
])
def test_update_params_refuses_in_one_line_and_changes_nothing(text: str, fragment: str) -> None:
    params = ChatParams(temperature=0.3)
    with pytest.raises(ChatUsageError) as refused:
        update_params(params, f"top_p=0.5 {text}")  # the valid pair before it is not applied either
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert params == ChatParams(temperature=0.3)


def test_conversation_drops_oldest_exchanges_to_fit() -> None:
    conversation = Conversation("sys")
    for i in range(3):
        conversation.add(f"q{i}", f"a{i}")

    def count(messages: list[dict[str, str]]) -> int:  # ten tokens a message
        return 10 * len(messages)

    assert conversation.fit("new", count, 80) == 0 and len(conversation.turns) == 6
    assert conversation.fit("new", count, 40) == 2
    assert conversation.messages("new") == [{"role": "system", "content": "sys"}, {"role": "user", "content": "q2"},
                                            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "new"}]
    with pytest.raises(ChatUsageError, match="longer than the 15 tokens"):
        conversation.fit("new", count, 15)
    assert len(conversation.turns) == 2, "a message that cannot fit drops nothing"


def test_session_fits_the_context_and_refuses_a_reply_longer_than_it() -> None:
    seen: list[list[Any]] = []
    session = Session(lambda messages, *rest: seen.append(messages) or "ok", ChatParams(max_new_tokens=30),
                      count_tokens=lambda messages: 10 * len(messages), context=60)
    notes: list[str] = []
    for text in ("a", "b", "c"):
        session.reply(text, notes.append)
    assert [len(messages) for messages in seen] == [1, 3, 3], "30 tokens for the prompt: one exchange + the message"
    assert notes == ["(forgot the oldest 1 exchange(s) to fit the model's 60 tokens)\n"]
    session.params = ChatParams(max_new_tokens=60)
    with pytest.raises(ChatUsageError, match="max_new_tokens=60 leaves no room"):
        session.reply("d", notes.append)


# ---- the session loop with a scripted model ------------------------------------------------------------------------


def scripted_session(lines: list[str | type[BaseException]]) -> tuple[Session, list[Any], list[str]]:
    """A session whose model answers 'reply N' in two streamed pieces, or is stopped by Ctrl-C after one piece
    when the message is 'interrupt'; `lines` are what the user types (an exception class: that key)."""
    calls: list[Any] = []
    written: list[str] = []

    def respond(messages: list[Any], params: ChatParams, turn: int, write: Any) -> str:
        calls.append((messages, params, turn))
        write("partial ")
        if messages[-1]["content"] == "interrupt":
            raise KeyboardInterrupt
        write("reply")
        return f"partial reply {turn}"

    pending = list(lines)

    def read(prompt: str) -> str:
        written.append(prompt)
        item = pending.pop(0)
        if isinstance(item, type):
            raise item
        return item

    session = Session(respond)
    run_session(session, read, written.append)
    assert not pending, "the loop stopped early"
    return session, calls, written


def test_session_commands_history_and_ctrl_c() -> None:
    session, calls, written = scripted_session([
        "hi", "", "/params temperature=0 max_new_tokens=9", "/params bogus=1", "/bogus", "interrupt",
        KeyboardInterrupt, "again", "/system Be brief.", "after system", "/reset", "last", EOFError])
    output = "".join(written)
    assert "temperature=0.0 top_p=1.0 max_new_tokens=9 seed=0" in output
    assert "error: unknown parameter 'bogus'" in output and "error: unknown command '/bogus'" in output
    assert "partial  [stopped]" in output and "(Ctrl-D or /quit leaves)" in output
    assert "(system prompt: 'Be brief.'; conversation forgotten)" in output and "(conversation forgotten)" in output
    assert [call[2] for call in calls] == [0, 1, 2, 3, 4], "each reply gets the next turn number (its seed)"
    assert calls[0][1] == ChatParams() and calls[1][1] == ChatParams(temperature=0.0, max_new_tokens=9)
    # The stopped reply stays in the history as far as it was shown; the empty line sent nothing.
    assert calls[2][0] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "partial reply 0"},
                           {"role": "user", "content": "interrupt"}, {"role": "assistant", "content": "partial"},
                           {"role": "user", "content": "again"}]
    assert calls[3][0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "after system"}]
    assert calls[4][0] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "last"}]
    assert session.conversation.turns[-1] == {"role": "assistant", "content": "partial reply 4"}


def test_quit_ends_the_session() -> None:
    _, calls, written = scripted_session(["/help", "/quit"])
    assert "/params [key=value ...]" in "".join(written) and not calls


def test_policy_check_refuses_other_artifacts_before_loading() -> None:
    reward = SimpleNamespace(ref="rm@v1", manifest=SimpleNamespace(stage="reward"))
    registry = SimpleNamespace(resolve=lambda ref: reward)
    expected = r"rm@v1 is a reward artifact \(from `align reward`\); `align chat` talks to a policy \(sft"
    with pytest.raises(ArtifactError, match=expected):
        policy_artifact(registry, "rm@v1")  # type: ignore[arg-type]


# ---- the real model ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def greedy_reply(sft_registry: Path) -> str:
    """tiny-sft@v2's greedy reply to MESSAGE by transformers' own `generate`, decoded by the tokenizer."""
    import torch
    from transformers import GenerationConfig

    from align import models
    from align.artifacts import Registry

    registry = Registry(sft_registry)
    model, tokenizer = models.load_artifact_model(registry.resolve(REF), registry)
    text = tokenizer.apply_chat_template([{"role": "user", "content": MESSAGE}], tokenize=False,
                                        add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    config = GenerationConfig(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    reply = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert reply
    return reply


def test_prompt_gives_transformers_greedy_reply(sft_registry: Path, greedy_reply: str, capsys: Any,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from align.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit) as stopped:
        main(["chat", REF, "--registry", str(sft_registry), "--prompt", MESSAGE, "--temperature", "0",
              "--max-new-tokens", str(MAX_NEW_TOKENS)])
    out, err = capsys.readouterr()
    assert stopped.value.code == 0, err[-2000:]
    assert out.strip() == greedy_reply


def test_sampled_replies_stream_what_generate_samples_draws(sft_registry: Path) -> None:
    """At temperature 1 with a system prompt, the streamed reply (in several pieces) is align's batched sampler's
    sample for the same conversation and seed; a second turn reads the first exchange and draws from seed + 1."""
    from align import generation
    from align.artifacts import Registry
    from align.chat import load_chat_model

    registry = Registry(sft_registry)
    chat = load_chat_model(registry.resolve(REF), registry, "fp32")
    session = Session(chat.respond, ChatParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, seed=5),
                      Conversation("You tell stories."), chat.count_tokens, chat.context)
    pieces: tuple[list[str], list[str]] = ([], [])
    first = session.reply(MESSAGE, pieces[0].append)
    second = session.reply("And then?", pieces[1].append)
    for streamed, reply in zip(pieces, (first, second), strict=True):
        assert len(streamed) > 2 and "".join(streamed).strip() == reply, "streamed piece by piece, the reply's text"
    settings = {"chat_template": chat.chat_template, "max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0}
    system = [{"role": "system", "content": "You tell stories."}]
    assert first == generation.generate(chat.model, chat.tokenizer, [[*system, {"role": "user", "content": MESSAGE}]],
                                        seed=5, **settings)[0]
    history = [*system, {"role": "user", "content": MESSAGE}, {"role": "assistant", "content": first},
               {"role": "user", "content": "And then?"}]
    assert second == generation.generate(chat.model, chat.tokenizer, [history], seed=6, **settings)[0]


def read_until(fd: int, pattern: str, seen: list[str], timeout: float = 120) -> str:
    """Read the terminal until `pattern` shows up in what arrived since the last match; returns that text."""
    deadline = time.monotonic() + timeout
    text = ""
    while pattern not in text:
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern!r} in {''.join(seen)[-3000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096).decode(errors="replace")
            except OSError:  # the other side closed
                chunk = ""
            assert chunk, f"the terminal closed before {pattern!r}: {''.join(seen)[-3000:]!r}"
            text += chunk
            seen.append(chunk)
    return text


def test_interactive_session_in_a_terminal(sft_registry: Path, greedy_reply: str, tmp_path: Path) -> None:
    """The real command on a pseudo-terminal that is its controlling terminal (so Ctrl-C is the terminal's SIGINT):
    a streamed reply, /params, a bad /params, /system, /reset, Ctrl-D. (Ctrl-C is covered by the session-loop tests
    with a scripted model: a terminal's SIGINT did not reach the child in every environment the suite runs in.)"""
    primary, secondary = os.openpty()
    env = {**align_env(tmp_path / "cache"), "TERM": "dumb", "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "align", "chat", REF, "--registry", str(sft_registry), "--temperature", "0",
         "--max-new-tokens", str(MAX_NEW_TOKENS)],
        cwd=REPO, env=env, stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True,
        preexec_fn=functools.partial(fcntl.ioctl, 0, termios.TIOCSCTTY, 0))  # runs after setsid: the tty is ours
    os.close(secondary)
    seen: list[str] = []

    def send(text: str) -> None:
        os.write(primary, text.encode())

    try:
        # Imports and loading take long on a busy machine.
        banner = read_until(primary, f"chatting with {REF}", seen, timeout=300)
        if "> " not in banner.split(f"chatting with {REF}", 1)[1]:  # the prompt may arrive in the banner's chunk
            read_until(primary, "> ", seen)
        send(MESSAGE + "\n")
        assert greedy_reply in read_until(primary, "\n> ", seen).replace("\r", "")
        send("/params temperature=0 top_p=0.5\n")
        assert "temperature=0.0 top_p=0.5 max_new_tokens=24 seed=0" in read_until(primary, "\n> ", seen)
        send("/params top_p=2\n")
        assert "error: top_p must be a number in (0, 1], not '2'" in read_until(primary, "\n> ", seen)
        send("/system You are a cat.\n")
        assert "(system prompt: 'You are a cat.'; conversation forgotten)" in read_until(primary, "\n> ", seen)
        send("Who are you?\n")
        reply = read_until(primary, "\n> ", seen).replace("\r", "").split("Who are you?\n", 1)[-1]
        assert reply.strip("> \n"), "no reply after /system"
        send("/reset\n")
        assert "(conversation forgotten)" in read_until(primary, "\n> ", seen)
        send("\x04")  # Ctrl-D at an empty prompt: end of input
        assert process.wait(timeout=30) == 0, "".join(seen)[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(primary)
    assert "Traceback" not in "".join(seen)


@pytest.mark.parametrize("ref, fragment", [("tiny-sfx@v1", "tiny-sfx"), ("tiny-sft@v9", "tiny-sft@v9")])
def test_unknown_refs_are_refused_before_weights(ref: str, fragment: str, sft_registry: Path, capsys: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from align.cli import main

    monkeypatch.setenv("ALIGN_FORBID_WEIGHTS", "1")  # any weight load would be a RuntimeError (exit 1)
    with pytest.raises(SystemExit) as stopped:
        main(["chat", ref, "--registry", str(sft_registry), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith("error: ") and fragment in err, err
    assert "Traceback" not in err


def test_bad_options_are_refused_naming_the_option(capsys: Any) -> None:
    from align.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["chat", REF, "--registry", "/nonexistent", "--max-new-tokens", "0", "--prompt", "hi"])
    assert stopped.value.code == 2 and "--max-new-tokens: max_new_tokens must be" in capsys.readouterr().err


def test_an_empty_prompt_is_a_user_error() -> None:
    from align.chat import one_turn

    with pytest.raises(AlignError, match="--prompt: the message is empty"):
        one_turn(Session(lambda *args: ""), "  ", print)
