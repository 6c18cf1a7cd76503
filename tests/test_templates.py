"""Chat templates: parity with transformers' own apply_chat_template, and refusal of an end-of-turn token that the
base model cannot produce."""

import pytest
from transformers import AutoTokenizer

from pipeline.data import templates
from pipeline.data.render import RenderSettings, TemplateError, render, token_mask
from pipeline.data.templates import ChatTemplateError

CONVERSATIONS = [
    [{"role": "user", "content": "copy\na b c"}, {"role": "assistant", "content": "a b c"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "sort\nc a"},
        {"role": "assistant", "content": "a c"},
    ],
]


def settings_for(template, tokenizer):
    return RenderSettings(
        data_format="messages",
        template=template,
        end_of_turn="<|im_end|>",
        max_length=512,
        template_kwargs=dict(tokenizer.special_tokens_map),
    )


@pytest.mark.parametrize("choice", ["chatml", "target"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_rendering_and_ids_equal_apply_chat_template(tiny_models, choice, conversation):
    target = AutoTokenizer.from_pretrained(tiny_models["target"])
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    template = templates.load_template(choice, target)
    text, spans = render(conversation, settings_for(template, target))
    assert text == target.apply_chat_template(conversation, tokenize=False)
    ids = base(text, add_special_tokens=False)["input_ids"]
    assert ids == target.apply_chat_template(conversation, tokenize=True, return_dict=False)
    replies = [m["content"] + "<|im_end|>" for m in conversation if m["role"] == "assistant"]
    assert [text[start:end] for start, end in spans] == replies


def test_generation_markers_give_the_same_mask_as_transformers(tiny_models):
    target = AutoTokenizer.from_pretrained(tiny_models["target"])
    template = templates.load_template("chatml", target)
    conversation = CONVERSATIONS[1]
    expected = target.apply_chat_template(
        conversation, chat_template=template, return_assistant_tokens_mask=True, return_dict=True, tokenize=True
    )
    text, spans = render(conversation, settings_for(template, target))
    encoding = target.backend_tokenizer.encode(text, add_special_tokens=False)
    assert token_mask(encoding, spans) == expected["assistant_masks"]


def test_end_of_turn_token_is_found_and_must_be_special_in_the_base(tiny_models, tmp_path):
    base = AutoTokenizer.from_pretrained(tiny_models["base"])
    chatml = templates.load_template("chatml", None)
    assert templates.end_of_turn_token(chatml, base, {}) == "<|im_end|>"
    llama_like = chatml.replace("<|im_end|>", "<|eot_id|>")
    with pytest.raises(ChatTemplateError, match=r"<\|eot_id\|>.*not a special token of the base tokenizer"):
        templates.end_of_turn_token(llama_like, base, {})
    no_end = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="nothing"):
        templates.end_of_turn_token(no_end, base, {})


def test_template_choices_resolve_or_name_the_problem(tmp_path, tiny_models):
    assert templates.template_file("chatml") == templates.TEMPLATES_DIR / "chatml.jinja"
    assert templates.template_file("target") is None
    with pytest.raises(ChatTemplateError, match="no template named 'chatlm'"):
        templates.template_file("chatlm")
    with pytest.raises(ChatTemplateError, match="file not found"):
        templates.template_file(str(tmp_path / "missing.jinja"))
    custom = tmp_path / "mine.jinja"
    custom.write_text("{{ messages[0]['content'] }}")
    assert templates.template_file(str(custom)) == custom
    assert (
        templates.local_tokenizer_template(tiny_models["target"])
        == AutoTokenizer.from_pretrained(tiny_models["target"]).chat_template
    )
    templates.check_template("target", str(tiny_models["target"]))
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        templates.check_template("target", str(tmp_path))


def test_a_template_without_markers_that_is_not_a_growing_prefix_is_refused(tiny_models):
    target = AutoTokenizer.from_pretrained(tiny_models["target"])
    odd = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + ':\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    with pytest.raises(TemplateError, match="growing prefix"):
        render(CONVERSATIONS[0], settings_for(odd, target))
