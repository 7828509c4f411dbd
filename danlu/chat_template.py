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
Its work is bounded too: `render_chat(..., time_limit=s)` stops a template that runs longer (a loop
over a large range, a recursive macro), and a `*` or `+` that would build a string or list of more
than MAX_ITEMS items raises, so a template cannot freeze or exhaust the server that renders it.

>>> render_chat(DEFAULT_TEMPLATE, [{"role": "user", "content": "你好"}])
'<|im_start|>user\\n你好<|im_end|>\\n<|im_start|>assistant\\n'
"""
from __future__ import annotations

import functools
import sys
import time

from danlu.registry import ConfigError

END_OF_TURN = "<|im_end|>"
MAX_ITEMS = 1 << 20  # longest string or list a template's `*` or `+` may build

DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class TemplateError(ConfigError):
    """The template is broken, or refused these messages (through `raise_exception(...)`)."""


def render_chat(template: str, messages, add_generation_prompt: bool = True, time_limit: float | None = None,
                **variables) -> str:
    """Render `messages` ([{role, content}]) with a Jinja chat template in the sandbox.

    Templates written for Hugging Face work unchanged: they see `messages`, `add_generation_prompt`,
    `bos_token`/`eos_token` (given as keyword variables) and may call `raise_exception(message)`.
    With `time_limit` (seconds), a template still running after that long raises TemplateError.
    """
    import jinja2

    try:
        compiled = _compile(template)
        with _deadline(time_limit):
            return compiled.render(messages=list(messages), add_generation_prompt=add_generation_prompt, **variables)
    except TemplateError:
        raise
    except (MemoryError, RecursionError):
        raise TemplateError("chat template: too much work for these messages") from None
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

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "+", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    right * abs(left).bit_length() > 1 << 16:
                raise TemplateError("chat template: `**` would build a number of more than 65,536 bits")
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                left, right = right, left  # 3 * 'ab' is 'ab' * 3
            if isinstance(left, (str, list, tuple)):
                size = len(left) * right if operator == "*" and isinstance(right, int) else \
                    len(left) + (len(right) if hasattr(right, "__len__") else 0)
                if size > MAX_ITEMS:
                    raise TemplateError(f"chat template: `{operator}` would build {size:,} items (at most {MAX_ITEMS:,})")
            return super().call_binop(context, operator, left, right)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise TemplateError(f"chat template: {e}") from None


class _deadline:
    """Within the block, the template code of this thread raises TemplateError once `seconds` have passed.

    Python's trace hook sees each line the compiled template runs (jinja2 compiles a template to Python
    code whose file is "<template>"); other code is not traced. A loop with no call in its body would
    escape any check made in the sandbox's call or attribute hooks; it does not escape this one."""

    def __init__(self, seconds):
        self.seconds, self.previous = seconds, None

    def __enter__(self):
        if self.seconds is None:
            return self
        end = time.perf_counter() + self.seconds
        seconds = self.seconds

        def line(frame, event, arg):
            if time.perf_counter() > end:
                raise TemplateError(f"chat template: still rendering after {seconds:g} s; stopped")
            return line

        def call(frame, event, arg):
            return line if frame.f_code.co_filename == "<template>" else None

        self.previous = sys.gettrace()
        sys.settrace(call)
        return self

    def __exit__(self, *exc):
        if self.seconds is not None:
            sys.settrace(self.previous)
