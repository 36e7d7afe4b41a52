"""Tokenizer for transformers-layout checkpoints: encode/decode, chat template, streaming text.

Wraps a `tokenizers.Tokenizer` and reads the special-token and chat-template settings that
transformers keeps beside it, without depending on transformers itself. Rendering the chat
template lives in `chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers

from zayaserve.replicas.model.chat_template import ChatRenderer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]

REPLACEMENT_CHAR = "\ufffd"


def _read_optional_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> str | None:
    # Older tokenizer_config files store special tokens as serialized AddedToken dicts.
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _config_chat_template(config: Mapping[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class Tokenizer:
    """A checkpoint's tokenizer plus its special tokens and chat template."""

    def __init__(
        self,
        hf: tokenizers.Tokenizer,
        tokenizer_config: Mapping[str, Any] | None = None,
        model_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.hf = hf  # the Hugging Face `tokenizers.Tokenizer` underneath
        tok_cfg = dict(tokenizer_config or {})
        model_cfg = dict(model_config or {})
        self.bos_token = _token_text(tok_cfg.get("bos_token"))
        self.eos_token = _token_text(tok_cfg.get("eos_token"))
        self.pad_token = _token_text(tok_cfg.get("pad_token"))
        self.add_bos_token = bool(tok_cfg.get("add_bos_token", False))
        self.chat_template = chat_template or _config_chat_template(tok_cfg)

        # config.json is what generation stops on; the tokenizer's own tokens fill gaps.
        self.bos_token_id = self._config_id(model_cfg.get("bos_token_id"), self.bos_token)
        self.pad_token_id = self._config_id(model_cfg.get("pad_token_id"), self.pad_token)
        eos = model_cfg.get("eos_token_id")
        eos_ids = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
        if not all(isinstance(i, int) for i in eos_ids):
            raise ValueError(f"config.json eos_token_id must be an int or list of ints: {eos}")
        own_eos = self._token_id(self.eos_token)
        if own_eos is not None and own_eos not in eos_ids:
            eos_ids.append(own_eos)
        self.eos_token_ids: list[int] = eos_ids
        # Templates render bos_token/eos_token as text, so recover them when only ids are known.
        if self.bos_token is None and self.bos_token_id is not None:
            self.bos_token = hf.id_to_token(self.bos_token_id)
        if self.eos_token is None and eos_ids:
            self.eos_token = hf.id_to_token(eos_ids[0])

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json`, plus `tokenizer_config.json` and `config.json` if present."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {tok_file}")
        try:
            hf = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises a bare Exception for bad JSON
            raise ValueError(f"cannot load {tok_file}: {e}") from e
        tok_cfg = _read_optional_json(path / "tokenizer_config.json")
        model_cfg = _read_optional_json(path / "config.json")
        # transformers v5 saves the template as its own file, which wins over the config entry.
        jinja_file = path / "chat_template.jinja"
        template = jinja_file.read_text(encoding="utf-8") if jinja_file.is_file() else None
        return cls(hf, tok_cfg, model_cfg, template)

    def _token_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf.token_to_id(token)

    def _config_id(self, value: Any, token: str | None) -> int | None:
        return value if isinstance(value, int) else self._token_id(token)

    @property
    def vocab_size(self) -> int:
        return int(self.hf.get_vocab_size(with_added_tokens=True))

    @cached_property
    def all_special_ids(self) -> list[int]:
        ids = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}
        ids.update(i for i in (self.bos_token_id, self.pad_token_id) if i is not None)
        ids.update(self.eos_token_ids)
        return sorted(ids)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.hf.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Encode rendered chat prompts with add_special_tokens=False:
        the template already starts with the bos token."""
        ids: list[int] = self.hf.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        # tokenizer.json may already add bos through its post-processor; never add it twice.
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def decode_batch(self, windows: list[list[int]], skip_special_tokens: bool = True
                     ) -> list[str]:
        """`decode` of each window, in one call into the Rust tokenizer."""
        return list(self.hf.decode_batch(windows, skip_special_tokens=skip_special_tokens))

    @cached_property
    def _chat(self) -> ChatRenderer:
        return ChatRenderer(self)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        """Render the conversation as prompt text.

        Encoding this text parses special-token text written INSIDE a message as control
        tokens (a user could forge another role's turn): to get token ids, use `render_chat`
        or `encode_chat`, which keep message text as text.
        """
        return self._chat.text(messages, add_generation_prompt, extra)

    def encode_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> list[int]:
        """The token ids of the rendered conversation; see `render_chat`."""
        return self.render_chat(messages, add_generation_prompt, **extra)[1]

    def render_chat(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None, **extra: Any
    ) -> tuple[str, list[int]]:
        """The prompt text and its token ids, with the messages' text kept as data.

        Special tokens come only from the template (and its bos/eos variables): special-token
        text in any string of a message (content, name, tool calls...) is tokenized as plain
        text, as transformers' `split_special_tokens=True` would, content only. A conversation
        without such text gets exactly `encode(apply_chat_template(...), False)`. `tools`
        (function definitions) are data in the same way; `extra` template variables are
        trusted: they are not escaped.
        """
        return self._chat.render(messages, add_generation_prompt, extra, tools)


class IncrementalDetokenizer:
    """Turns a stream of generated ids into text deltas, never splitting a UTF-8 character.

    Byte-level tokens can end partway through a character, which decodes as U+FFFD. Each step
    decodes only a short window: the tokens since `prefix` (already emitted) and the new ones
    since `read`. The text beyond the prefix is emitted once it no longer ends in U+FFFD.
    Decoding a window with a little left context also keeps decoders that treat the first
    token specially (SentencePiece-style space stripping) from dropping spaces.
    """

    PROMPT_CONTEXT_TOKENS = 5
    # A real character spans at most 4 bytes, so only garbage bytes stay unfinished this long;
    # emitting them anyway bounds the window.
    MAX_HELD_TOKENS = 8
    # Ids before the window are never decoded again; drop them once this many pile up.
    _TRIM_AT = 64

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-self.PROMPT_CONTEXT_TOKENS :])
        self._prefix = 0
        self._read = len(self._ids)
        self.text = ""

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def windows(self) -> tuple[list[int], list[int]]:
        """The two id windows the next delta compares: emitted-prefix context, and all."""
        return self._ids[self._prefix : self._read], self._ids[self._prefix :]

    def _delta(self, allow_partial: bool) -> str:
        prefix_ids, full_ids = self.windows()
        return self.advance(self._decode(prefix_ids), self._decode(full_ids), allow_partial)

    def advance(self, prefix_text: str, full_text: str, allow_partial: bool = False) -> str:
        """The delta, given the decoded `windows()` (decoded here or in a batch)."""
        if len(full_text) <= len(prefix_text):
            return ""  # e.g. a skipped special token: keep the window and wait
        unfinished = full_text.endswith(REPLACEMENT_CHAR) and not allow_partial
        if unfinished and len(self._ids) - self._read < self.MAX_HELD_TOKENS:
            return ""  # the next token may complete the character
        delta = full_text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        if self._prefix >= self._TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        self.text += delta
        return delta

    def add(self, token_id: int) -> str:
        """Take one generated id; return the text it completes (often "", never half a char)."""
        self._ids.append(token_id)
        return self._delta(allow_partial=False)

    def push(self, token_id: int) -> None:
        """Take one id whose delta `add_batch` computes."""
        self._ids.append(token_id)

    def flush(self) -> str:
        """At the end of generation, release held-back text even if it is an unfinished char."""
        return self._delta(allow_partial=True)


def add_batch(detoks: Sequence[IncrementalDetokenizer | None], token_ids: Sequence[int]
              ) -> list[str]:
    """`detok.add(token)` for many detokenizers at once (None: no text, ""), with all their
    windows decoded in one call per tokenizer and special-token setting."""
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, (d, t) in enumerate(zip(detoks, token_ids, strict=True)):
        if d is not None:
            d.push(t)
            groups.setdefault((id(d.tokenizer), d.skip_special_tokens), []).append(i)
    out = [""] * len(detoks)
    for (_, skip), members in groups.items():
        first = detoks[members[0]]
        assert first is not None
        windows = [w for i in members for w in detoks[i].windows()]  # type: ignore[union-attr]
        texts = first.tokenizer.decode_batch(windows, skip_special_tokens=skip)
        for j, i in enumerate(members):
            out[i] = detoks[i].advance(texts[2 * j], texts[2 * j + 1])  # type: ignore[union-attr]
    return out
