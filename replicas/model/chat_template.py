"""Chat-template rendering for `Tokenizer`: Jinja prompt text, and token ids that keep message
text as data.

`ChatRenderer` renders a checkpoint's chat template in a sandboxed Jinja environment, as
transformers does. Encoding that text as a whole would parse special-token text written inside
a message (say "<|im_start|>system") as control tokens, letting a user forge another role's
turn. So `ChatRenderer.render` finds such text in the messages, renders again with each one
swapped for an unused private-use character, tokenizes the special tokens the template wrote as
such, and re-encodes every segment between them that holds a swapped character as plain text,
the original text restored. A conversation without special-token text encodes exactly as the
whole rendered prompt does.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any, NoReturn

import tokenizers
from jinja2 import Template, TemplateError
from jinja2.defaults import DEFAULT_NAMESPACE
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import htmlsafe_json_dumps

from zayaserve.replicas.validation_errors import ParamError

if TYPE_CHECKING:
    from zayaserve.replicas.model.tokenizer import Tokenizer

__all__ = ["BUILTIN_NAMES", "RESERVED_VARIABLES", "ChatRenderer", "check_template_kwargs"]

# Variables the renderer sets itself; extra template variables may not override them.
RESERVED_VARIABLES = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token",
                                "tools", "documents"})
# Names of what templates call (Jinja's globals: range, dict, namespace, lipsum, cycler,
# joiner; our raise_exception) and `self` (Jinja's template reference, and the renderer's own
# argument): a variable of that name would replace the function, breaking the render.
BUILTIN_NAMES = frozenset(DEFAULT_NAMESPACE) | {"raise_exception", "self"}

# Private-use code points (plane 15) stand in for special-token text found in messages while the
# template renders; those picked occur nowhere in the conversation or the rendered prompt.
_MARK_CODE_POINTS = range(0xF0000, 0xFFFFE)
# The same code points as `tojson` writes them (a surrogate pair of \u escapes).
_JSON_PAIR = re.compile(r"\\ud[89ab][0-9a-f]{2}\\ud[c-f][0-9a-f]{2}")
# An extra token in the plain-text tokenizer copy only, encoded (then dropped) in front of a text
# segment that follows a special token, so the segment tokenizes as "not at the start of the
# input" (Metaspace prepend_scheme="first" and the like), exactly as in a whole-prompt encode.
_ANCHOR = "\U0010fffd\U0010fffc\U0010fffb"


def _raise_exception(message: str) -> NoReturn:
    raise ValueError(f"chat template error: {message}")


def _normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Check roles and contents, flattening text-part lists into plain strings."""
    if not isinstance(messages, Sequence) or isinstance(messages, str):
        raise ValueError("messages must be a list of {'role': ..., 'content': ...} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ParamError(f"messages[{i}]", f"messages[{i}] must be an object, got "
                                               f"{type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ParamError(f"messages[{i}].role", f"messages[{i}].role must be a string")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    raise ParamError(f"messages[{i}].content[{j}].type",
                                     f"messages[{i}].content[{j}].type must be 'text'")
                if not isinstance(part.get("text"), str):
                    raise ParamError(f"messages[{i}].content[{j}].text",
                                     f"messages[{i}].content[{j}].text must be a string")
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and message.get("tool_calls"):
            content = ""  # an assistant turn that only calls tools
        elif not isinstance(content, str):
            raise ParamError(f"messages[{i}].content",
                             f"messages[{i}].content must be a string or a list of text parts")
        out.append({**message, "content": content})
    return out


def _strings(value: Any) -> Iterator[str]:
    """Every string inside a message or tool: values and keys of nested objects (a tool's
    JSON schema names its properties with keys), items of lists."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_map_strings(v, fn) for v in value]
    return value


def _trie_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """A regex matching any of `words`, longest first. Built as a trie, it stays fast with
    thousands of words (some vocabularies reserve thousands of special tokens)."""
    trie: dict[str, Any] = {}
    for word in words:
        node = trie
        for ch in word:
            node = node.setdefault(ch, {})
        if word:
            node[""] = {}

    def build(node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        body = alts[0] if len(alts) == 1 else f"(?:{'|'.join(alts)})" if alts else ""
        return f"(?:{body})?" if "" in node and body else body

    return re.compile(build(trie)) if trie else None


def _marks(count: int, haystack: str) -> list[str]:
    """`count` private-use characters that occur in `haystack` neither raw nor as JSON escapes."""
    used = set(haystack)
    used.update(json.loads(f'"{m}"') for m in _JSON_PAIR.findall(haystack))
    marks = list(itertools.islice((chr(c) for c in _MARK_CODE_POINTS if chr(c) not in used),
                                  count))
    if len(marks) < count:
        raise ValueError("messages: too many private-use characters to encode this chat")
    return marks


def check_template_kwargs(extra: Mapping[str, Any], where: str = "chat_template_kwargs") -> None:
    """Refuses extra template variables named like a reserved variable or a built-in, with a
    ParamError naming `<where>.<name>` (the first such name, in sorted order)."""
    bad = sorted(str(name) for name in (RESERVED_VARIABLES | BUILTIN_NAMES) & set(extra))
    if not bad:
        return
    param = f"{where}.{bad[0]}"
    if bad[0] in RESERVED_VARIABLES:
        raise ParamError(param, f"{param}: set by the server, not a request")
    raise ParamError(param, f"{param}: names a chat-template built-in, not a variable")


class ChatRenderer:
    """One tokenizer's chat template: compiled on first use, with the special-token lookups and
    the plain-text tokenizer copy that `render` needs, built once and kept."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @cached_property
    def _template(self) -> Template:
        source = self.tokenizer.chat_template
        if source is None:
            raise ValueError("this checkpoint has no chat template (tokenizer_config.json)")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        try:
            return env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"the checkpoint's chat template does not parse: {e}") from e

    def _render(self, conversation: list[dict[str, Any]], add_generation_prompt: bool,
                extra: Mapping[str, Any], tools: list[Any] | None = None) -> str:
        context = {
            **extra,
            **({"tools": tools} if tools is not None else {}),
            "messages": conversation,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.tokenizer.bos_token or "",
            "eos_token": self.tokenizer.eos_token or "",
        }
        try:
            return self._template.render(context)
        except TemplateError as e:
            # SecurityError lands here too: a template poking at internals is a template bug.
            raise ValueError(f"chat template failed to render: {e}") from e

    def text(self, messages: Sequence[Any], add_generation_prompt: bool,
             extra: Mapping[str, Any], tools: list[Any] | None = None) -> str:
        """The prompt text (see `Tokenizer.apply_chat_template`)."""
        check_template_kwargs(extra)
        return self._render(_normalize_messages(messages), add_generation_prompt, extra, tools)

    def render(self, messages: Sequence[Any], add_generation_prompt: bool,
               extra: Mapping[str, Any], tools: list[Any] | None = None
               ) -> tuple[str, list[int]]:
        """The prompt text and its ids, message text kept as data (see `Tokenizer.render_chat`).
        `tools` (function definitions) are data too: they come from the request."""
        check_template_kwargs(extra)
        conversation = _normalize_messages(messages)
        text = self._render(conversation, add_generation_prompt, extra, tools)
        data = [conversation, tools or []]
        found = {t for s in _strings(data) for t in self._special_texts(s)}
        if not found:
            return text, self.tokenizer.encode(text, add_special_tokens=False)
        # Render again with each special-token text in the messages replaced by a private-use
        # character (transforms such as `| trim` still apply), then tokenize the template's
        # special tokens as such and everything between them, marks restored, as plain text.
        texts = sorted(found)
        marks = _marks(len(texts), text + "".join(_strings(data)))
        to_mark = dict(zip(texts, marks, strict=True))
        escape = _trie_pattern(texts)
        assert escape is not None
        escaped, escaped_tools = _map_strings(
            data, lambda s: escape.sub(lambda m: to_mark[m.group()], s))
        rendered = self._render(escaped, add_generation_prompt, extra,
                                escaped_tools if tools is not None else None)
        back = dict(zip(marks, texts, strict=True))
        # `| tojson` writes a mark as a \u escape pair; give back what it writes for the text.
        back.update({json.dumps(m)[1:-1]: str(htmlsafe_json_dumps(t))[1:-1]
                     for m, t in zip(marks, texts, strict=True)})
        pattern = re.compile("|".join(map(re.escape, back)))

        def restore(s: str) -> str:
            return pattern.sub(lambda m: back[m.group()], s)

        return restore(rendered), self._encode_marked(rendered, pattern, restore)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        decoder = self.tokenizer.hf.get_added_tokens_decoder()
        return frozenset(i for i, t in decoder.items() if t.special)

    @cached_property
    def _special_matcher(self) -> tuple[re.Pattern[str] | None, bool]:
        """A regex for the special tokens' text, and whether any is matched after the
        normalizer (then only the tokenizer itself finds every form of it)."""
        decoder = self.tokenizer.hf.get_added_tokens_decoder()
        special = [t for t in decoder.values() if t.special]
        return _trie_pattern(t.content for t in special), any(t.normalized for t in special)

    def _special_texts(self, text: str) -> set[str]:
        pattern, normalized = self._special_matcher
        found = set(pattern.findall(text)) if pattern is not None else set()
        if normalized:
            enc = self.tokenizer.hf.encode(text, add_special_tokens=False)
            found.update(text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True)
                         if i in self._special_ids)
        return found

    @cached_property
    def _plain(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that encodes special-token text as plain text."""
        plain = tokenizers.Tokenizer.from_str(self.tokenizer.hf.to_str())
        plain.encode_special_tokens = True
        plain.add_tokens([tokenizers.AddedToken(_ANCHOR, normalized=False, special=False)])
        return plain

    def _encode_marked(self, rendered: str, marks: re.Pattern[str],
                       restore: Callable[[str], str]) -> list[int]:
        """Ids of `rendered`: its special tokens as such; the text between two of them as in a
        whole encode when it holds no mark, else re-encoded as plain text, marks restored."""
        enc = self.tokenizer.hf.encode(rendered, add_special_tokens=False)
        ids: list[int] = []
        pending: list[int] = []
        start = 0

        def flush(end: int) -> None:
            segment = rendered[start:end]
            if not marks.search(segment):
                ids.extend(pending)
                return
            plain = restore(segment)
            if start > 0 and _ANCHOR not in plain:  # after a special token: not the start
                ids.extend(self._plain.encode(_ANCHOR + plain, add_special_tokens=False).ids[1:])
            else:
                ids.extend(self._plain.encode(plain, add_special_tokens=False).ids)

        for token_id, (begin, end) in zip(enc.ids, enc.offsets, strict=True):
            if token_id in self._special_ids:
                flush(begin)
                ids.append(token_id)
                start, pending = end, []
            else:
                pending.append(token_id)
        flush(len(rendered))
        return ids
