"""Source rows of each instruct format → one conversation (a list of {role, content}), or a reason code.

Reason codes (what `rejected.jsonl` and `report.json` count):
  missing_field      a required field (instruction, output, conversations, messages, text, role...) is absent/null
  not_a_string       a text field holds something else (a number, a list...)
  not_a_list         `conversations`/`messages` is not a list of mappings
  unknown_role       a turn's role is not system/user/assistant (sharegpt also: human, gpt)
  empty_turn         a user or system turn is empty
  empty_reply        an assistant reply is empty
  misplaced_system   a system turn after the first turn
  consecutive_turns  two assistant replies in a row (two user turns in a row are joined into one)
  no_user_turn       no user turn before the first reply
  no_reply           the conversation does not end with an assistant reply
  empty_text         format text: the text is empty
and, found later (pipeline.data.render): invalid_json (a JSON Lines line that is not an object), template_error
(the chat template refused the conversation), overlength (longer than train.max_seq_length with overlength: drop).
"""

from __future__ import annotations

from typing import Any

FORMAT_FIELDS = {
    "alpaca": ("instruction", "input", "output", "system"),
    "sharegpt": ("conversations", "from", "value", "system"),
    "messages": ("messages", "role", "content"),
    "text": ("text",),
}
# The fields read inside each turn of a conversation; the others are columns of the row.
TURN_FIELDS = ("from", "value", "role", "content")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
MESSAGES_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


class RowRejected(ValueError):
    """A row that cannot become a valid conversation; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def to_conversation(
    row: dict[str, Any],
    data_format: str,
    columns: dict[str, str],
    system_prompt: str | None,
    *,
    prompt_only: bool = False,
) -> list[dict[str, str]]:
    """The conversation of one source row; raises RowRejected. `columns` maps a format field to the source column
    (or turn key) that holds it, e.g. {"instruction": "prompt"}. `prompt_only`: the conversation up to its last user
    turn, a prompt for a model to answer (a reply after it, or an alpaca row's output, is dropped; none is needed)."""

    def field(name: str, source: dict = row) -> Any:
        return source.get(columns.get(name, name))

    def named(name: str) -> str:
        """A field as the user knows it: its source column, and the field it stands for when renamed."""
        return f"'{columns[name]}' (the {name} field)" if name in columns else name

    if data_format == "alpaca":
        instruction = _string(field("instruction"), named("instruction"))
        extra = _string(field("input"), named("input"), required=False)
        user = f"{instruction}\n{extra}" if extra.strip() else instruction
        system = _string(field("system"), named("system"), required=False)
        messages = ([{"role": "system", "content": system}] if system.strip() else []) + [
            {"role": "user", "content": user}
        ]
        if not prompt_only:
            messages.append({"role": "assistant", "content": _string(field("output"), named("output"))})
    elif data_format in ("sharegpt", "messages"):
        key, role_key, content_key, roles = (
            ("conversations", "from", "value", SHAREGPT_ROLES)
            if data_format == "sharegpt"
            else ("messages", "role", "content", MESSAGES_ROLES)
        )
        turns = field(key)
        if turns is None:
            raise RowRejected("missing_field", f"no '{columns.get(key, key)}' field")
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise RowRejected("not_a_list", f"'{columns.get(key, key)}' is not a list of turns")
        messages = []
        for index, turn in enumerate(turns):
            role = _string(field(role_key, turn), f"{key}[{index}].{columns.get(role_key, role_key)}")
            if role not in roles:
                raise RowRejected("unknown_role", f"{key}[{index}] has role {role!r}; expected one of {sorted(roles)}")
            content = _string(field(content_key, turn), f"{key}[{index}].{columns.get(content_key, content_key)}")
            messages.append({"role": roles[role], "content": content})
        if data_format == "sharegpt":
            system = _string(field("system"), "system", required=False)
            if system.strip() and not (messages and messages[0]["role"] == "system"):
                messages.insert(0, {"role": "system", "content": system})
    else:
        raise ValueError(f"unknown dataset format {data_format!r}")
    if prompt_only:
        while messages and messages[-1]["role"] == "assistant":
            messages.pop()
    return _validated(messages, system_prompt, prompt_only=prompt_only)


def to_text(row: dict[str, Any], columns: dict[str, str]) -> str:
    text = _string(row.get(columns.get("text", "text")), columns.get("text", "text"))
    if not text.strip():
        raise RowRejected("empty_text", "the text is empty")
    return text


def _string(value: Any, name: str, *, required: bool = True) -> str:
    shown = name if name.startswith("'") else f"'{name}'"
    if value is None:
        if required:
            raise RowRejected("missing_field", f"{shown} is missing")
        return ""
    if not isinstance(value, str):
        raise RowRejected("not_a_string", f"{shown} is a {type(value).__name__}, not a string")
    return value


def _validated(
    messages: list[dict[str, str]], system_prompt: str | None, *, prompt_only: bool = False
) -> list[dict[str, str]]:
    """Join split user turns, add the recipe's system prompt where the row has none, and check the shape:
    [system] user assistant (user assistant)*, or with `prompt_only` [system] user (assistant user)*."""
    joined: list[dict[str, str]] = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "system" and index > 0:
            raise RowRejected("misplaced_system", f"turn {index} is a system turn after the conversation started")
        if not content.strip():
            reason = "empty_reply" if role == "assistant" else "empty_turn"
            raise RowRejected(reason, f"turn {index} ({role}) is empty")
        if joined and joined[-1]["role"] == role:
            if role == "assistant":
                raise RowRejected("consecutive_turns", f"turns {index - 1} and {index} are both assistant replies")
            joined[-1] = {"role": role, "content": joined[-1]["content"] + "\n" + content}
            continue
        joined.append({"role": role, "content": content})
    if system_prompt and not (joined and joined[0]["role"] == "system"):
        joined.insert(0, {"role": "system", "content": system_prompt})
    dialogue = joined[1:] if joined and joined[0]["role"] == "system" else joined
    if not dialogue or dialogue[0]["role"] != "user":
        raise RowRejected("no_user_turn", "the conversation does not start with a user turn")
    if prompt_only:
        return joined  # a trailing reply was dropped before: the dialogue ends with a user turn
    if dialogue[-1]["role"] != "assistant":
        raise RowRejected("no_reply", "the conversation does not end with an assistant reply")
    return joined
