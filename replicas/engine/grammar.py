"""Structured outputs with xgrammar: compiled grammars, one matcher per sequence, and the
token bitmask the sampler applies.

xgrammar is an optional dependency, `pip install 'zayaserve[structured]'`:
it is imported on the first constrained request, so a plain install serves everything else
and answers constrained requests with an error that says what to install. Compiled grammars
are cached by the compiler (keyed by the constraint), so a schema sent again is not
recompiled. A request's grammar is compiled once, when it arrives, within the compile limits
(grammar_compile.py), and the request holds it: matchers are made from it, never by compiling.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from zayaserve.replicas.engine.config import RequestLimits
from zayaserve.replicas.engine.grammar_compile import CompiledGrammar, CompilePool
from zayaserve.replicas.engine.grammar_vocab import tokenizer_info
from zayaserve.replicas.engine.json_grammar import json_schema_ebnf, without_surrogates
from zayaserve.replicas.engine.regex_dialect import regex_ebnf
from zayaserve.replicas.engine.structured import StructuredOutputsParams
from zayaserve.replicas.validation_errors import ParamError

if TYPE_CHECKING:
    from zayaserve.replicas.model.tokenizer import Tokenizer

__all__ = ["CompileOnEngineThreadError", "GrammarCompiler", "GrammarMask", "INSTALL_HINT",
           "forbid_compiles", "no_compiles"]

INSTALL_HINT = "pip install 'zayaserve[structured]'"
_CACHE_BYTES = 256 * 2**20
# Optional whitespace in JSON comes in runs of at most this many characters: enough to indent
# seven levels deep, while an unbounded run lets a model loop on newlines until max_tokens.
MAX_JSON_WHITESPACE = 16
_local = threading.local()  # `forbidden`: a compile on this thread is a bug


class CompileOnEngineThreadError(RuntimeError):
    """A grammar compile was asked for on the engine's step thread (a bug: it would stall
    every running request's decode)."""


@contextmanager
def no_compiles() -> Iterator[None]:
    """Within the block, a compile on this thread raises CompileOnEngineThreadError."""
    before = getattr(_local, "forbidden", False)
    _local.forbidden = True
    try:
        yield
    finally:
        _local.forbidden = before


def forbid_compiles() -> None:
    """From now on, a compile on this thread raises (the async engine's loop thread)."""
    _local.forbidden = True


def refuse_compile_here() -> None:
    """Raises where compiles are forbidden (a bug if it ever does)."""
    if getattr(_local, "forbidden", False):
        raise CompileOnEngineThreadError(
            f"a grammar compile on {threading.current_thread().name}, which must never compile "
            "(grammars are compiled when their request arrives and held by it)")


def _import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise ParamError("structured_outputs", "structured outputs need the xgrammar package, "
                         f"which this server does not have ({INSTALL_HINT})") from e
    return xgrammar


def choice_grammar(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly the given strings."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    # JSON's escapes for quotes, backslashes and control characters are also xgrammar's EBNF
    # string escapes. Other characters stay as they are: an astral character written as a JSON
    # surrogate pair (\ud83d\ude00) would be two invalid code points to xgrammar.
    return json.dumps(text, ensure_ascii=False)


class GrammarCompiler:
    """Compiles constraints for one tokenizer and vocabulary (the model's logits width)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: Sequence[int],
                 max_threads: int = 2) -> None:
        self.xgr = _import_xgrammar()
        # Each token as the detokenizer writes it; special tokens allowed nowhere.
        info = tokenizer_info(self.xgr, tokenizer, vocab_size, stop_token_ids)
        self.vocab_size = vocab_size
        self.compiler = self.xgr.GrammarCompiler(
            info, max_threads=max_threads, cache_enabled=True, cache_limit_bytes=_CACHE_BYTES)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar (cached); a constraint xgrammar refuses is a ParamError."""
        refuse_compile_here()
        try:
            return self._compile(spec)
        except ParamError:
            raise
        except Exception as e:  # xgrammar raises RuntimeError/ValueError with its reason
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ParamError(f"structured_outputs.{spec.kind}",
                             f"structured_outputs.{spec.kind}: cannot compile ({reason})") from e

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        c = self.compiler
        if spec.json is not None or spec.json_object:
            # The schema's grammar as EBNF with JSON's own string rules (json_grammar.py:
            # xgrammar's length-bounded strings admit raw control characters).
            schema = spec.json if spec.json is not None else '{"type": "object"}'
            options: dict[str, Any] = ({"any_whitespace": False} if spec.disable_any_whitespace
                                       else {"max_whitespace_cnt": MAX_JSON_WHITESPACE})
            return c.compile_grammar(json_schema_ebnf(self.xgr, schema, **options))
        if spec.regex is not None:  # as Python reads it (regex_dialect.py)
            return c.compile_grammar(f"root ::= {regex_ebnf(spec.regex)}")
        if spec.choice is not None:
            return c.compile_grammar(choice_grammar(spec.choice))
        assert spec.grammar is not None
        return c.compile_grammar(without_surrogates(str(self.xgr.Grammar.from_ebnf(spec.grammar))))

    def matcher(self, compiled: Any, stop_token_ids: Sequence[int]) -> Any:
        """A matcher of a compiled grammar that lets the given tokens end the text only where
        its grammar does."""
        return self.xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_token_ids) or None)

    def mask(self, rows: int) -> GrammarMask:
        return GrammarMask(self.xgr, rows, self.vocab_size)


class GrammarMask:
    """The step's token bitmask: rows with a matcher get its allowed tokens, others all."""

    def __init__(self, xgr: Any, rows: int, vocab_size: int) -> None:
        self.xgr = xgr
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(rows, vocab_size)
        self.rows: list[int] = []

    def fill(self, row: int, matcher: Any) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, row)
        self.rows.append(row)

    def apply(self, logits: torch.Tensor) -> None:
        """Set the disallowed tokens of the constrained rows to -inf, in place."""
        if not self.rows:
            return
        bitmask = self.bitmask.to(logits.device, non_blocking=True)
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size,
                                             indices=self.rows)


class Grammars:
    """An engine's structured outputs: the grammar compiler (made on first use), the compile of
    a request's grammar when it arrives, a matcher per sequence and the mask of each step."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 stop_token_ids: Sequence[int], limits: RequestLimits | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        limits = limits if limits is not None else RequestLimits.model_validate({})
        self.compiles = CompilePool(lambda spec: self.compiler().compile(spec),
                                    limits.max_concurrent_grammar_compiles,
                                    limits.max_grammar_compile_s)

    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                if self.tokenizer is None:
                    raise ParamError("structured_outputs", "structured outputs need a "
                                     "tokenizer and this model has none")
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size,
                                               self.stop_token_ids)
            return self._compiler

    def compile(self, spec: StructuredOutputsParams | None) -> CompiledGrammar | None:
        """The request's grammar, compiled (or found cached) within the compile limits: a bad
        one is a ParamError, a slow one too, and no free compile worker EngineOverloadedError.
        Blocks the calling thread, which must not be the engine's step thread."""
        if spec is None:
            return None
        refuse_compile_here()
        return self.compiles.compile(spec)

    async def compile_async(self, spec: StructuredOutputsParams | None
                            ) -> CompiledGrammar | None:
        """`compile` for the async engine: the event loop waits, no thread does."""
        return None if spec is None else await self.compiles.compile_async(spec)

    def check(self, spec: StructuredOutputsParams | None) -> None:
        """Refuses a request whose grammar cannot be compiled (see `compile`)."""
        self.compile(spec)

    def held(self, spec: StructuredOutputsParams | None,
             grammar: CompiledGrammar | None) -> CompiledGrammar | None:
        """What a request arriving with `spec` holds: `grammar`, compiled by its caller, else
        `spec` compiled now (on the calling thread)."""
        if grammar is None:
            return self.compile(spec)
        if grammar.spec != spec:
            raise ValueError("grammar: compiled for another constraint than the request's")
        return grammar

    def matcher(self, spec: StructuredOutputsParams | None, grammar: CompiledGrammar | None,
                output_ids: Sequence[int], stop_token_ids: Sequence[int] = ()) -> Any:
        """A new sequence's matcher, made from the compiled grammar its request holds (never
        compiling) and advanced over the output tokens it already has. The eos ids and the
        request's `stop_token_ids` are its stop tokens: each may be sampled only where the
        grammar is complete, so none can cut a constrained text short."""
        if spec is None:
            return None
        if grammar is None or grammar.spec != spec:
            raise RuntimeError("a constrained sequence without its request's compiled grammar")
        stops = list(dict.fromkeys([*self.stop_token_ids, *stop_token_ids]))
        matcher = self.compiler().matcher(grammar.compiled, stops)
        for token in output_ids:
            matcher.accept_token(token)
        return matcher

    def step_mask(self, matchers: Sequence[Any]) -> GrammarMask | None:
        """The mask for a step's sampling rows (None where no row is constrained)."""
        if all(m is None for m in matchers):
            return None
        mask = self.compiler().mask(len(matchers))
        for row, matcher in enumerate(matchers):
            if matcher is not None:
                mask.fill(row, matcher)
        return mask
