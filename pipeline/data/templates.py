"""Chat templates: which one a recipe means, and the end-of-turn token it ends assistant replies with.

`chat_template` in a recipe is `target` (the target tokenizer's own template), a name of a file in
data_templates/<name>.jinja, or a path to a .jinja file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import ConfigProblem
from pipeline.fingerprint import hash_json, sha256_file
from pipeline.models.hub import ModelNotFound, check_model_reference

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "data_templates"
PROBE = [{"role": "user", "content": "PROBE_USER"}, {"role": "assistant", "content": "PROBE_REPLY"}]


class ChatTemplateError(ConfigProblem):
    """A chat template choice that cannot be used: missing, absent from the target tokenizer, or ending replies with
    a token the base cannot emit."""


def template_file(choice: str) -> Path | None:
    """The .jinja file a recipe's `chat_template` names, or None for `target`. Raises ChatTemplateError if missing."""
    if choice == "target":
        return None
    named = TEMPLATES_DIR / f"{choice}.jinja"
    if "/" not in choice and not choice.endswith(".jinja"):
        if named.is_file():
            return named
        known = sorted(p.stem for p in TEMPLATES_DIR.glob("*.jinja"))
        raise ChatTemplateError(
            f"no template named {choice!r} in {TEMPLATES_DIR} (known: {known}); "
            "use `target`, a known name, or a path to a .jinja file"
        )
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ChatTemplateError(f"file not found: {choice}")
    return path


def local_tokenizer_template(model_dir: Path) -> str | None:
    """The chat template saved with a local tokenizer (chat_template.jinja, or tokenizer_config.json's key), read
    without loading the tokenizer; None when it has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def check_template(choice: str, target_model: str) -> None:
    """Cheap check for --dry-run: the template file exists, or a local target has a template."""
    if (
        template_file(choice) is None
        and Path(target_model).is_dir()
        and not local_tokenizer_template(Path(target_model))
    ):
        raise ChatTemplateError(
            f"target: the target tokenizer in {target_model} has no chat template; "
            "choose a name in data_templates/ (e.g. chatml) or a .jinja path"
        )


def load_template(choice: str, target_tokenizer) -> str:
    """The template text; `target_tokenizer` is only used (and may only be loaded) for `chat_template: target`."""
    path = template_file(choice)
    if path is not None:
        return path.read_text(encoding="utf-8")
    template = target_tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ChatTemplateError(
            "target: the target tokenizer has no chat template; choose a name in data_templates/ (e.g. chatml) "
            "or a .jinja path"
        )
    return template


def end_of_turn_token(template: str, base_tokenizer, template_kwargs: dict) -> str:
    """The token the template writes right after an assistant reply, which must be one special token of the BASE
    tokenizer: the adapter is trained on the base, and a model only learns to stop if it can emit that token."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered = render_jinja_template([PROBE], chat_template=template, **template_kwargs)[0][0]
    after = rendered[rendered.index("PROBE_REPLY") + len("PROBE_REPLY") :]
    special = {t.content: i for i, t in base_tokenizer.added_tokens_decoder.items() if t.special}
    token = next((t for t in sorted(special, key=len, reverse=True) if after.startswith(t)), None)
    if token is None:
        shown = after[:40] or "(nothing)"
        ids = base_tokenizer.encode(after[:40], add_special_tokens=False)
        raise ChatTemplateError(
            f"assistant replies end with {shown!r}, which is not a special token of the base "
            f"tokenizer (it encodes as {len(ids)} tokens {base_tokenizer.convert_ids_to_tokens(ids)[:8]}). The "
            "adapter is trained on the base model, so the base must know the end-of-turn token as one special "
            "token to learn when to stop; use a template whose turns end with one of "
            f"{sorted(special)} or add the token to the base tokenizer."
        )
    return token


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


def tokenizer_fingerprint(reference: str) -> str:
    """Identity of a tokenizer (and its template) without loading it: its files' content, or the Hub id."""
    path = Path(reference).expanduser()
    if not path.is_dir():
        return hash_json({"hub_id": reference})
    return hash_json({name: sha256_file(path / name) for name in TOKENIZER_FILES if (path / name).is_file()})


def template_identity(choice: str, target_model: str) -> str:
    """What the rendered text depends on besides the data: the template file's content, or for `target` the target
    tokenizer's identity (its template lives there)."""
    path = template_file(choice)
    return sha256_file(path) if path else tokenizer_fingerprint(target_model)


def load_tokenizer(reference: str, key: str, trust_remote_code: bool = False):
    """A tokenizer from a local model directory or a Hub id (tokenizer files only), with an error naming the key."""
    from transformers import AutoTokenizer

    check_model_reference(reference, key)
    try:
        return AutoTokenizer.from_pretrained(reference, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise ModelNotFound(
            f"{key}: cannot load the tokenizer of {reference}: {str(error).splitlines()[0]}. Point "
            f"{key} to a local model directory, or download it where there is network."
        ) from None


@dataclass(frozen=True)
class ChatFormat:
    """How a recipe's conversations become tokens: the base tokenizer (the LoRA trains on the base), the template
    text, the special tokens the template may use, and the token that ends an assistant turn."""

    tokenizer: object
    template: str
    end_of_turn: str
    template_kwargs: dict = field(default_factory=dict)


def chat_format(chat_template: str, base_model: str, target_model: str, trust_remote_code: bool = False) -> ChatFormat:
    """Resolve a recipe's `chat_template` against its base tokenizer (loads tokenizers, never weights); the
    template sees the special tokens of the tokenizer it belongs to (the target's for `target`). Prepare and
    evaluate both render with it."""
    base = load_tokenizer(base_model, "base_model", trust_remote_code)
    owner = base if template_file(chat_template) else load_tokenizer(target_model, "target_model", trust_remote_code)
    template = load_template(chat_template, owner)
    template_kwargs = dict(owner.special_tokens_map)
    return ChatFormat(base, template, end_of_turn_token(template, base, template_kwargs), template_kwargs)
