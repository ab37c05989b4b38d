"""A checkpoint's chat template, rendered exactly as transformers renders it.

transformers compiles a chat template (jinja) in ``utils/chat_template_utils.py``
(``_cached_compile_jinja_template``) with a sandboxed environment and a few helpers of its own, and
``PreTrainedTokenizerBase.apply_chat_template`` renders it with the messages, ``tools``,
``documents``, ``add_generation_prompt`` and the tokenizer's named special tokens. Templates in the
wild use those helpers (``raise_exception``, ``strftime_now``, ``namespace``, ``tojson``), so the
same environment is rebuilt here; the rendered text is then tokenized by ``tracer.tokenizer``.
"""

from __future__ import annotations

import json
from datetime import datetime

from .errors import TokenizerError


def render(compiled, messages, *, add_generation_prompt: bool, token_strings: dict[str, str], source: str) -> str:
    """Render a template from :func:`compile_template` (given lazily: a callable returning it) for
    ``messages``; a refusal or a render error is a one-line TokenizerError naming ``source``."""
    from jinja2.exceptions import TemplateError

    try:
        template = compiled()
        # transformers: render_jinja_template(messages, tools=None, documents=None,
        # add_generation_prompt, **special_tokens_map) in PreTrainedTokenizerBase.apply_chat_template.
        return template.render(messages=_normalize_messages(messages), tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **token_strings)
    except _TemplateRefused as exc:
        raise TokenizerError(f"{source}: the chat template refused the messages: {exc}") from None
    except TemplateError as exc:
        raise TokenizerError(f"{source}: the chat template failed to render: {one_line(exc)}") from None


def one_line(exc: Exception) -> str:
    """An exception's message on one line."""
    return " ".join(str(exc).split())


def _normalize_messages(messages) -> list[dict]:
    # transformers' _normalize_chat_messages: dicts only, keys whose value is None dropped.
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("chat needs at least one message (a list of {'role', 'content'} dicts)")
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        out.append({k: v for k, v in m.items() if v is not None})
    return out


class _TemplateRefused(Exception):
    """The template called raise_exception(...): it refuses these messages."""


def compile_template(source: str):
    """The chat template compiled as transformers compiles it (utils/chat_template_utils.py,
    ``_cached_compile_jinja_template``): a sandboxed environment with trim_blocks and
    lstrip_blocks, the loopcontrols extension and a ``{% generation %}`` tag (rendered as its
    body), a ``tojson`` that keeps non-ASCII and does not escape HTML, and the globals
    ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace``."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateRefused(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_generation_tag(), jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=_TemplateDict(),
                       namespace=_namespace_class())
    return env.from_string(source)


def _generation_tag():
    """transformers' AssistantTracker extension: ``{% generation %}...{% endgeneration %}`` marks
    the assistant's text; rendered without an assistant mask, it writes its body unchanged."""
    import jinja2.ext
    import jinja2.nodes

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    return GenerationTag


def _namespace_class():
    """transformers' TemplateNamespace: jinja's ``namespace`` without underscore attributes (no
    way through them to CPython internals)."""
    import jinja2.utils
    from jinja2.exceptions import SecurityError

    def check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"chat templates cannot set underscore attributes on a namespace ({name!r})")

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # jinja's signature trick: namespace(self=...) still works
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    return Namespace


class _TemplateDict:
    """transformers' TemplateDict: ``dict(...)`` and ``dict.fromkeys(...)`` in a template, without
    handing it the dict type itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


