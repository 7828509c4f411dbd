"""Chat templates: a list of messages -> the one prompt string a language model was trained on.

A run carries its own template (`Run.chat_template`, the run's chat_template.jinja: Jinja, as Hugging Face
tokenizers carry theirs); without one, DEFAULT_TEMPLATE is ChatML (OpenAI's chat markup, also Qwen's and SmolLM2's):

    <|im_start|>system
    You are helpful.<|im_end|>
    <|im_start|>user
    你好<|im_end|>
    <|im_start|>assistant

Templates are rendered in jinja2's immutable sandbox: a template file travels with a downloaded
run, so it must not reach Python internals (attribute access to `__class__`, `mro()`, ... raises).

>>> render_chat(DEFAULT_TEMPLATE, [{"role": "user", "content": "你好"}])
'<|im_start|>user\\n你好<|im_end|>\\n<|im_start|>assistant\\n'
"""
from __future__ import annotations

import functools

from danlu.registry import ConfigError

END_OF_TURN = "<|im_end|>"

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ConfigError):
    """The template is broken, or refused these messages (through `raise_exception(...)`)."""


def render_chat(template: str, messages, add_generation_prompt: bool = True, **variables) -> str:
    """Render `messages` ([{role, content}]) with a Jinja chat template in the sandbox.

    Templates written for Hugging Face work unchanged: they see `messages`, `add_generation_prompt`,
    `bos_token`/`eos_token` (given as keyword variables) and may call `raise_exception(message)`.
    """
    import jinja2

    try:
        compiled = _compile(template)
        return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"chat template: unsafe operation refused by the sandbox: {e}") from None
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template: {e}") from None


def stop_sequences(template: str) -> tuple:
    """Strings that end an assistant turn under this template (generation stops there)."""
    return (END_OF_TURN,) if END_OF_TURN in template else ()


@functools.lru_cache(maxsize=8)
def _compile(template):
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template: {e}") from None
