"""Chat templates rendered the way transformers renders them, without transformers.

A template is Jinja shipped in tokenizer_config.json (`chat_template`: a string, or a list of named
templates) or in chat_template.jinja. It is untrusted code from the hub, so it runs in jinja2's
immutable sandbox, with the environment transformers gives it (trim_blocks, lstrip_blocks,
loopcontrols, `raise_exception`, a non-HTML-escaping `tojson`, `strftime_now`) and the special
tokens as variables. Rendered text already holds BOS etc., so it is encoded without adding them again.

A model with no template is still chattable: turns are concatenated as "role: content" lines
(`plain_chat`), and the caller tells the user once.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from moe_local.errors import GenerationError

Message = dict[str, Any]


def _raise_exception(message: str) -> None:
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes (<, >, &), which would change the prompt: transformers replaces it too.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str):
    """Compile once per template text (chat renders the same template every turn)."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def pick_template(template: str | dict[str, str] | None, name: str | None = None) -> str | None:
    """A named template from a list-style `chat_template` ("default" unless `name` is given)."""
    if template is None or isinstance(template, str):
        return template
    if name is not None:
        if name not in template:
            raise GenerationError(f"no chat template named {name!r}; available: {', '.join(sorted(template))}")
        return template[name]
    return template.get("default") or next(iter(template.values()), None)


def render_chat(template: str, messages: list[Message], special_tokens: dict[str, str] | None = None,
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render `messages` with `template`; a template error becomes a one-line GenerationError."""
    from jinja2.exceptions import TemplateError

    try:
        return compile_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt,
            **(special_tokens or {}), **extra,
        )
    except TemplateError as exc:
        raise GenerationError(f"chat template error: {exc}") from None


def plain_chat(messages: list[Message], add_generation_prompt: bool = True) -> str:
    """Fallback for models without a template: one "role: content" paragraph per turn."""
    text = "".join(f"{m['role']}: {m['content']}\n\n" for m in messages)
    return text + ("assistant: " if add_generation_prompt else "")
