"""Chat templates of a checkpoint folder, rendered as transformers renders them.

The template comes from chat_template.json, chat_template.jinja or tokenizer_config.json (a string,
or a list of named templates of which "default" is used). It is untrusted code, so it runs in
jinja2's ImmutableSandboxedEnvironment with transformers' settings: trim_blocks, lstrip_blocks,
the loopcontrols extension, a `tojson` that does not escape HTML, and the globals
`raise_exception` and `strftime_now`. The special tokens of tokenizer_config.json are variables.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Optional

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .jsonfile import read_json
from .errors import CheckpointError, PromptError

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class ChatTemplate:
    """A compiled chat template and the special-token variables it may read."""

    def __init__(self, source: str, where: str = "chat template", special_tokens: Optional[dict] = None):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise CheckpointError(f"{where}: line {e.lineno}: chat template syntax error ({e.message})") from None
        self.where = where
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_folder(cls, folder) -> Optional["ChatTemplate"]:
        """The folder's chat template (None if it has none)."""
        folder = Path(folder)
        tok_cfg = read_json(folder / "tokenizer_config.json", required=False) or {}
        specials = {}
        for name in SPECIAL_TOKENS:
            v = tok_cfg.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str):
                specials[name] = v
        js = read_json(folder / "chat_template.json", required=False)
        if js is not None and isinstance(js.get("chat_template"), str):
            return cls(js["chat_template"], str(folder / "chat_template.json"), specials)
        path = folder / "chat_template.jinja"
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), str(path), specials)
        t = tok_cfg.get("chat_template")
        if isinstance(t, list):
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default")
        if isinstance(t, str):
            return cls(t, str(folder / "tokenizer_config.json"), specials)
        return None

    def render(self, messages: list, add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text of a conversation (a list of {"role", "content"} dicts)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise PromptError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            return self.template.render(messages=messages, tools=None, documents=None,
                                        add_generation_prompt=add_generation_prompt,
                                        **{**self.special_tokens, **kwargs})
        except jinja2.exceptions.TemplateError as e:
            raise PromptError(f"{self.where}: the chat template rejected the messages ({e})") from None
