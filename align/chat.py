"""`align chat REF`: talk to a policy artifact in the terminal, one reply streamed token by token.

The model is the artifact exactly as `align eval` and `align export` load it (`models.load_artifact_model`: base +
chain merged in memory, its own adapter attached), its tokenizer and chat template are the artifact's, and a
reply is drawn by align's own sampling rule (`generation.next_tokens`: the argmax at temperature 0, else exactly
softmax(logits / T), nucleus-restricted when top_p < 1, from the random numbers `generation.uniforms` gives a
seed), so a reply here is the reply `generation.generate_samples` gives the same prompt, token for token — only
streamed. The conversation is kept as messages and rendered with the chat template every turn.

The pieces are small and mostly pure so that tests can drive them: `parse_command` (a typed line -> a command
or a message), `update_params` (validated `/params`), `Conversation` (history, system prompt, fitting the
model's context), `TextStream` (token ids -> printable text) and `run_session` (the loop, over any `read` and
`write` functions and any `respond` function).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from align import generation, models
from align.device import detect_device, resolve_precision
from align.errors import AlignError, ArtifactError
from align.stages import STAGES, stages_producing

if TYPE_CHECKING:
    from align.artifacts import Artifact, Registry
    from align.data import Message

HELP = """commands:
  /reset                      forget the conversation (the system prompt stays)
  /system TEXT                set the system prompt and start over (/system alone clears it)
  /params [key=value ...]     show the sampling parameters, or set some: temperature, top_p, max_new_tokens, seed
  /help                       this list
  /quit                       leave (so does Ctrl-D)
Ctrl-C while a reply is streaming stops that reply; //text sends "/text" as a message."""

COMMANDS = ("reset", "system", "params", "help", "quit")


class ChatUsageError(AlignError):
    """A command typed wrong inside a session: one line is printed and the session goes on."""


# ---- commands and parameters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A slash command: its name (one of COMMANDS) and the text after it."""

    name: str
    argument: str = ""


def parse_command(line: str) -> Command | str:
    """A typed line as a `Command` (a line starting with '/') or as the message text to send. '//' escapes a
    message that starts with a slash. An unknown command is a ChatUsageError, not a message: a typo such as
    '/rest' must not be sent to the model as if it were a question."""
    text = line.strip()
    if text.startswith("//"):
        return text[1:]
    if not text.startswith("/"):
        return text
    name, _, argument = text[1:].partition(" ")
    if name not in COMMANDS:
        raise ChatUsageError(f"unknown command '/{name}'; commands: {', '.join('/' + c for c in COMMANDS)}")
    if name in ("reset", "help", "quit") and argument.strip():
        raise ChatUsageError(f"/{name} takes no argument")
    return Command(name, argument.strip())


@dataclass(frozen=True)
class ChatParams:
    """How replies are sampled. `seed` is the first turn's; turn n draws from seed + n, so a session replays
    exactly from its seed while its replies do not all reuse the same random numbers."""

    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


def _float_at_least_zero(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


# name -> (parser raising ValueError, what a valid value is)
PARAMS: dict[str, tuple[Callable[[str], Any], str]] = {
    "temperature": (_float_at_least_zero, "a number >= 0 (0: greedy)"),
    "top_p": (_probability, "a number in (0, 1]"),
    "max_new_tokens": (_positive_int, "a whole number >= 1"),
    "seed": (int, "a whole number"),
}


def update_params(params: ChatParams, text: str) -> ChatParams:
    """`params` with the `key=value` pairs of `text` applied, all or none: an unknown key, a pair without '=' or
    a bad value is a one-line ChatUsageError and nothing changes."""
    changes: dict[str, Any] = {}
    for pair in text.split():
        key, equals, raw = pair.partition("=")
        if not equals:
            raise ChatUsageError(f"'{pair}': write key=value, e.g. temperature=0.7")
        if key not in PARAMS:
            raise ChatUsageError(f"unknown parameter '{key}'; known: {', '.join(PARAMS)}")
        parse, expected = PARAMS[key]
        try:
            changes[key] = parse(raw)
        except ValueError:
            raise ChatUsageError(f"{key} must be {expected}, not '{raw}'") from None
    return dataclasses.replace(params, **changes)


def format_params(params: ChatParams) -> str:
    return " ".join(f"{name}={getattr(params, name)}" for name in PARAMS)


# ---- the conversation ----------------------------------------------------------------------------------------


@dataclass
class Conversation:
    """The system prompt and the turns so far (user and assistant messages, alternating)."""

    system: str | None = None
    turns: list[Message] = field(default_factory=list)

    def messages(self, user: str) -> list[Message]:
        """What the model reads for its next reply: system prompt, the turns so far, the new user message."""
        head: list[Message] = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.turns, {"role": "user", "content": user}]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns = []

    def set_system(self, text: str) -> None:
        """A new system prompt starts a new conversation: the old replies answered under another one."""
        self.system = text or None
        self.reset()

    def fit(self, user: str, count_tokens: Callable[[list[Message]], int], limit: int) -> int:
        """Drop the oldest exchanges until system + history + `user` take at most `limit` tokens (the model's
        context less the reply's room); returns how many exchanges were dropped. When even the system prompt and
        `user` alone do not fit, a ChatUsageError and nothing is dropped."""
        if count_tokens(Conversation(self.system).messages(user)) > limit:
            raise ChatUsageError(f"the message (with the system prompt) is longer than the {limit} tokens the model "
                                 "can read before its reply; shorten it or lower max_new_tokens")
        dropped = 0
        while count_tokens(self.messages(user)) > limit:
            self.turns = self.turns[2:]
            dropped += 1
        return dropped


# ---- streaming text ------------------------------------------------------------------------------------------


class TextStream:
    """Reply token ids in, the text to print out, as `generation.reply_text` would decode the whole reply.

    Decoding a token alone loses the space that begins it ("They" + "liked"), so the reply is decoded after a
    few prompt tokens and the prompt's text is cut off; text ending in an unfinished multi-byte character is
    held back until its last byte arrives. Chat replies are stripped at the start, as `reply_text` strips them."""

    CONTEXT_TOKENS = 8

    def __init__(self, tokenizer: Any, prompt_ids: list[int], chat_template: str):
        self.tokenizer = tokenizer
        self.context = prompt_ids[-self.CONTEXT_TOKENS:]
        self.prefix = self._decode(self.context)
        self.strip_start = chat_template != "none"
        self.ids: list[int] = []
        self.shown = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """The text that token `token_id` adds to what was shown ('' while it is not printable yet)."""
        self.ids.append(token_id)
        full = self._decode(self.context + self.ids)
        text = full[len(self.prefix):] if full.startswith(self.prefix) else self._decode(self.ids)
        text = text.lstrip() if self.strip_start else text
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown):], text
        return piece


# ---- the model -----------------------------------------------------------------------------------------------


@dataclass
class ChatModel:
    """A policy artifact loaded for chatting, with everything a reply needs."""

    artifact: Artifact
    model: Any
    tokenizer: Any
    chat_template: str  # the artifact's: auto | default | none (plain text)
    precision: str
    device_type: str
    stop_ids: list[int]
    context: int | None  # tokens the model can read (max_position_embeddings), None when unknown

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids of the conversation as the model reads it before its reply, exactly as
        `generation.generate_samples` encodes a prompt."""
        text = generation.render_prompt(self.tokenizer, messages, self.chat_template)
        return self.tokenizer(text, add_special_tokens=self.chat_template == "none")["input_ids"]

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_ids(messages))

    def respond(self, messages: list[Message], params: ChatParams, turn: int, write: Callable[[str], None]) -> str:
        """Stream a reply to `messages` through `write` and return its text (`generation.reply_text`'s)."""
        prompt_ids = self.prompt_ids(messages)
        stream = TextStream(self.tokenizer, prompt_ids, self.chat_template)
        reply: list[int] = []

        def on_token(token_id: int) -> None:
            reply.append(token_id)
            piece = stream.push(token_id)
            if piece:
                write(piece)

        with models.compute_precision(self.precision, self.device_type), generation.weights_cast_once(self.model):
            stream_tokens(self.model, prompt_ids, on_token, stop_ids=self.stop_ids,
                          pad_id=self.tokenizer.pad_token_id or 0, temperature=params.temperature,
                          top_p=params.top_p, max_new_tokens=params.max_new_tokens, seed=params.seed + turn)
        return generation.reply_text(self.tokenizer, prompt_ids, reply, self.chat_template)


def stream_tokens(model: Any, prompt_ids: list[int], on_token: Callable[[int], None], *, stop_ids: list[int],
                  pad_id: int, temperature: float, top_p: float, max_new_tokens: int, seed: int) -> list[int]:
    """`generation.decode` for one prompt, handing each token to `on_token` as soon as it is chosen: the same
    prefill, the same `next_tokens` rule and the same random numbers (row 0 of `uniforms(1, max_new_tokens,
    seed)`), so the reply is the one `generate_samples` draws. Stops after a stop id; returns the reply's ids."""
    import torch

    device = next(model.parameters()).device
    draws = generation.uniforms(1, max_new_tokens, seed).to(device)
    stop = set(stop_ids)
    reply: list[int] = []
    with torch.no_grad():
        cache, step_inputs = generation.forward_inputs(model)
        logits, mask, positions = generation.prefill(model, [prompt_ids], cache, step_inputs, pad_id=pad_id,
                                                      device=device)
        for step in range(max_new_tokens):
            chosen = generation.next_tokens(logits.float(), temperature, top_p, draws[:, step])  # [1]
            token = int(chosen[0])
            reply.append(token)
            on_token(token)
            if token in stop or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, mask.new_ones((1, 1))], dim=1)
            positions = positions + 1
            logits = model(input_ids=chosen[:, None], attention_mask=mask, position_ids=positions,
                           **step_inputs).logits[:, -1]
    return reply


def policy_artifact(registry: Registry, ref: str) -> Artifact:
    """The artifact `ref` names, refused (ArtifactError, before any weights) unless a stage made it as a policy."""
    artifact = registry.resolve(ref)
    stage = artifact.manifest.stage
    if stage not in stages_producing("policy"):
        raise ArtifactError(f"{artifact.ref} is a {STAGES[stage].produces} artifact (from `align {stage}`); `align "
                            f"chat` talks to a policy ({', '.join(stages_producing('policy'))})")
    return artifact


def load_chat_model(artifact: Artifact, registry: Registry, precision: str = "auto") -> ChatModel:
    """The artifact's model and tokenizer as `align eval` loads them, in the precision `device.resolve_precision`
    makes of `precision` (a precision this machine cannot do is refused before the weights load)."""
    device = detect_device()
    base = models.BaseModelSpec.from_manifest(artifact.manifest.base_model)
    resolved = resolve_precision(precision, device, "align chat --precision", models.hidden_size(base))
    on = device["type"]
    model, tokenizer = models.load_artifact_model(artifact, registry, dtype=models.weight_dtype(resolved, on))
    if on == "cuda":
        model = model.to("cuda")
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    context = getattr(inner.config, "max_position_embeddings", None)
    return ChatModel(artifact, model, tokenizer, artifact.manifest.adapter.chat_template, resolved, on,
                     generation.stop_token_ids(model, tokenizer), context if isinstance(context, int) else None)


# ---- the session ---------------------------------------------------------------------------------------------

Respond = Callable[[list["Message"], ChatParams, int, Callable[[str], None]], str]


@dataclass
class Session:
    """One chat: the conversation, the sampling parameters and how many replies were drawn (the turn's seed)."""

    respond: Respond
    params: ChatParams = field(default_factory=ChatParams)
    conversation: Conversation = field(default_factory=Conversation)
    count_tokens: Callable[[list[Message]], int] | None = None
    context: int | None = None
    turn: int = 0

    def reply(self, user: str, write: Callable[[str], None]) -> str:
        """Answer `user` (streamed through `write`), remember the exchange and return the reply. Ctrl-C keeps the
        part of the reply already shown in the history, as the user saw it, and re-raises."""
        if self.count_tokens is not None and self.context is not None:
            if self.params.max_new_tokens >= self.context:
                raise ChatUsageError(f"max_new_tokens={self.params.max_new_tokens} leaves no room for the "
                                     f"conversation in the model's {self.context} tokens; lower it")
            dropped = self.conversation.fit(user, self.count_tokens, self.context - self.params.max_new_tokens)
            if dropped:
                write(f"(forgot the oldest {dropped} exchange(s) to fit the model's {self.context} tokens)\n")
        shown: list[str] = []

        def tee(piece: str) -> None:
            shown.append(piece)
            write(piece)

        self.turn += 1
        try:
            reply = self.respond(self.conversation.messages(user), self.params, self.turn - 1, tee)
        except KeyboardInterrupt:
            self.conversation.add(user, "".join(shown).strip())
            raise
        self.conversation.add(user, reply)
        return reply

    def command(self, command: Command) -> tuple[str, bool]:
        """Carry out a slash command: (what to print, whether the session ends)."""
        if command.name == "quit":
            return "", True
        if command.name == "help":
            return HELP, False
        if command.name == "reset":
            self.conversation.reset()
            return "(conversation forgotten)", False
        if command.name == "system":
            self.conversation.set_system(command.argument)
            shown = f"'{command.argument}'" if command.argument else "none"
            return f"(system prompt: {shown}; conversation forgotten)", False
        if command.argument:
            self.params = update_params(self.params, command.argument)
        return format_params(self.params), False


def run_session(session: Session, read: Callable[[str], str], write: Callable[[str], None],
                prompt: str = "> ") -> None:
    """The interactive loop: read a line (`read` raises EOFError at Ctrl-D), run a command or stream a reply.
    A mistyped command prints one error line; Ctrl-C while a reply streams stops that reply, Ctrl-C at the
    prompt only reminds how to leave; the session ends at /quit or end of input."""
    while True:
        try:
            line = read(prompt)
        except EOFError:
            write("\n")
            return
        except KeyboardInterrupt:
            write("\n(Ctrl-D or /quit leaves)\n")
            continue
        try:
            parsed = parse_command(line)
            if isinstance(parsed, Command):
                text, done = session.command(parsed)
                if text:
                    write(text + "\n")
                if done:
                    return
            elif parsed:
                session.reply(parsed, write)
                write("\n")
        except ChatUsageError as exc:
            write(f"error: {exc}\n")
        except KeyboardInterrupt:
            write(" [stopped]\n")


def params_from_options(**values: Any) -> ChatParams:
    """The command line's sampling options, checked by the rules `/params` follows; a bad one is an AlignError
    naming the option (exit 2)."""
    params = ChatParams()
    for key, value in values.items():
        try:
            params = update_params(params, f"{key}={value}")
        except ChatUsageError as exc:
            raise AlignError(f"--{key.replace('_', '-')}: {exc}") from None
    return params


def open_session(artifact: Artifact, registry: Registry, *, precision: str = "auto", system: str | None = None,
                 params: ChatParams | None = None) -> tuple[Session, ChatModel]:
    """Load a policy artifact (checked by `policy_artifact`) and start a session with it."""
    chat = load_chat_model(artifact, registry, precision)
    session = Session(chat.respond, params or ChatParams(), Conversation(system or None), chat.count_tokens,
                      chat.context)
    return session, chat


def one_turn(session: Session, message: str, write: Callable[[str], None]) -> str:
    """`align chat --prompt`: one reply streamed through `write`, a message that does not fit the model is an
    AlignError (exit 2)."""
    if not message.strip():
        raise AlignError("--prompt: the message is empty")
    try:
        reply = session.reply(message, write)
    except ChatUsageError as exc:
        raise AlignError(f"--prompt: {exc}") from None
    write("\n")
    return reply


def describe(chat: ChatModel) -> str:
    """The banner of an interactive session."""
    manifest = chat.artifact.manifest
    return (f"chatting with {chat.artifact.ref} ({manifest.stage} of {manifest.base_model.spec}; chat template "
            f"{chat.chat_template}, precision {chat.precision}). /help for commands, Ctrl-D to leave.")



def terminal_write(text: str) -> None:
    """Print without a newline and show it at once: a streamed reply appears token by token."""
    sys.stdout.write(text)
    sys.stdout.flush()


def terminal_session(session: Session, chat: ChatModel) -> None:
    """`run_session` on the terminal: `input()` (with line editing and history where readline exists)."""
    try:
        import readline  # noqa: F401  (importing it is what gives input() line editing)
    except ImportError:
        pass
    terminal_write(describe(chat) + "\n")
    run_session(session, input, terminal_write)
