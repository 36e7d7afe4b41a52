"""Build a deterministic byte-level BPE tokenizer for random-weight checkpoints.

We cannot download ZAYA1's tokenizer, so `zayaserve init-checkpoint` writes one built here. The
vocab is laid out by hand so that special tokens sit at exactly the ids the model config names
and the total size equals the model's vocab size: every id the model can sample must decode.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<bos>"
START_OF_TURN = "<start_of_turn>"
# The eos id names the end-of-turn token, so a chat reply stops generation where the turn ends.
EOS_TOKEN = END_OF_TURN = "<end_of_turn>"

# Gemma-style turns, as ZAYA1 uses; the assistant speaks as "model". Tools, tool calls and
# tool results use the Hermes format (<tools>, <tool_call>, <tool_response>) of Qwen3-family
# templates; without tools the prompt is plain Gemma turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<start_of_turn>system\\nYou may call these functions. To call one, "
    "write <tool_call>\\n{\"name\": <name>, \"arguments\": <arguments>}\\n</tool_call>\\n"
    "<tools>\\n' }}{% for tool in tools %}{{ tool | tojson ~ '\\n' }}{% endfor %}"
    "{{ '</tools><end_of_turn>\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% elif message['role'] in ['system', 'user'] %}{% set role = message['role'] %}"
    "{% elif message['role'] == 'tool' %}{% set role = 'user' %}"
    "{% else %}{{ raise_exception('unsupported role: ' ~ message['role']) }}{% endif %}"
    "{{ '<start_of_turn>' ~ role ~ '\\n' }}"
    "{% if message['role'] == 'tool' %}"
    "{{ '<tool_response>\\n' ~ message['content'] | trim ~ '\\n</tool_response>' }}"
    "{% else %}{{ message['content'] | trim }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>\\n' ~ {'name': "
    "call['function']['name'], 'arguments': call['function']['arguments']} | tojson ~ "
    "'\\n</tool_call>' }}{% endfor %}"
    "{{ '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Learning merges costs time roughly linear in their number; past this the vocab is filled with
# synthetic merges, which load and decode just as well and keep the 262k-vocab build fast.
MAX_LEARNED_MERGES = 8000
MAX_SYNTHETIC_TOKEN_CHARS = 12


def _words(spaced: str) -> list[str]:
    return spaced.split(" ")


# Syllable pieces for pseudo-English; the accented vowels give 2-byte merges.
_ONSETS = _words(" b c d f g h k l m n p r s t v w z st tr ch sh th pl gr qu")
_VOWELS = _words("a e i o u ai ea ou y é ü ø")
_CODAS = _words("   n r s t l m ng ck x")
# Multi-byte words so the learned merges include pieces of 2-, 3- and 4-byte characters.
_FOREIGN = _words("café naïve über straße niño 日本 日本語 東京 こんにちは привет мир مرحبا γειά")
_FOREIGN += ["🙂", "🚀", "👍🏽", "❤️", "🎉🎉"]
_PUNCT = [".", ".", ".", "!", "?", ",", ";", ":", " -", "..."]


def _special_layout(vocab_size: int, pad: int, bos: int, eos: int) -> dict[int, str]:
    ids = {"pad_token_id": pad, "bos_token_id": bos, "eos_token_id": eos}
    for name, value in ids.items():
        if not 0 <= value < vocab_size:
            raise ValueError(f"{name}={value} is outside the vocab [0, {vocab_size})")
    if len(set(ids.values())) != len(ids):
        raise ValueError(f"special token ids must be distinct, got {ids}")
    layout = {pad: PAD_TOKEN, bos: BOS_TOKEN, eos: END_OF_TURN}
    # Gemma keeps <start_of_turn> right before <end_of_turn>; follow it when that id is free.
    start = eos - 1 if eos >= 1 and eos - 1 not in layout else _lowest_free(layout)
    layout[start] = START_OF_TURN
    return layout


def _lowest_free(taken: dict[int, str]) -> int:
    return next(i for i in range(len(taken) + 1) if i not in taken)


def _corpus(rng: random.Random, n_words: int) -> list[str]:
    """Pseudo-English sentences, Zipf-distributed so frequent words become whole tokens."""
    lexicon = [
        "".join(
            rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
            for _ in range(rng.randint(1, 4))
        )
        for _ in range(max(200, n_words // 30))
    ]
    lexicon += _FOREIGN
    rng.shuffle(lexicon)
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    words = rng.choices(lexicon, weights=weights, k=n_words)
    lines = []
    for start in range(0, n_words, 12):
        sentence = words[start : start + 12]
        sentence[0] = sentence[0].capitalize()
        if rng.random() < 0.3:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 2100)))
        lines.append(" ".join(sentence) + rng.choice(_PUNCT))
    return lines


def _learn_merges(n_merges: int, seed: int) -> list[tuple[str, str]]:
    if n_merges <= 0:
        return []
    rng = random.Random(seed)
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + n_merges,
        min_frequency=2,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # More merges need more distinct words to come from; this keeps the tiny build quick.
    scratch.train_from_iterator(_corpus(rng, 5_000 + 12 * n_merges), trainer)
    merges = json.loads(scratch.to_str())["model"]["merges"]
    # Older `tokenizers` wrote merges as "a b" strings, newer ones as pairs.
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    return [(left, right) for left, right in pairs]


def build_tokenizer(
    vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int, seed: int = 0
) -> Tokenizer:
    """A byte-level BPE whose full vocab is exactly `vocab_size` with specials at the given ids."""
    specials = _special_layout(vocab_size, pad_token_id, bos_token_id, eos_token_id)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < len(specials) + len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{len(specials) + len(alphabet)} ids ({len(specials)} specials + 256 bytes)"
        )
    vocab = {token: i for i, token in specials.items()}
    free_ids = (i for i in range(vocab_size) if i not in specials)
    for char in alphabet:
        vocab[char] = next(free_ids)

    n_left = vocab_size - len(vocab)
    merges: list[tuple[str, str]] = []
    for left, right in _learn_merges(min(n_left, MAX_LEARNED_MERGES), seed):
        merges.append((left, right))
        # Two merges can spell the same string; the second one reuses the first one's id.
        if left + right not in vocab and len(vocab) < vocab_size:
            vocab[left + right] = next(free_ids)

    # Fill what training did not reach with concatenations of existing pieces: they keep the
    # model's random samples decoding to word-like text rather than placeholder names.
    rng = random.Random(seed * 1_000_003 + vocab_size)
    pool = [t for t in vocab if t not in specials.values()]
    while len(vocab) < vocab_size:
        left, right = rng.choice(pool), rng.choice(pool)
        token = left + right
        if token in vocab:
            continue
        merges.append((left, right))
        vocab[token] = next(free_ids)
        if len(token) <= MAX_SYNTHETIC_TOKEN_CHARS:
            pool.append(token)

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_token_id)],
    )
    # Specials already hold their ids in the model vocab; registering them makes the encoder
    # match them in text and lets decode(skip_special_tokens=True) drop them.
    tok.add_special_tokens(
        [AddedToken(specials[i], special=True, normalized=False) for i in sorted(specials)]
    )
    return tok


def write_tokenizer_files(
    out_dir: Path,
    vocab_size: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    seed: int = 0,
) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` (with a chat template) to `out_dir`."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(vocab_size, bos_token_id, eos_token_id, pad_token_id, seed)
    for token, want in [
        (PAD_TOKEN, pad_token_id),
        (BOS_TOKEN, bos_token_id),
        (EOS_TOKEN, eos_token_id),
    ]:
        got = tok.token_to_id(token)
        if got != want:
            raise RuntimeError(f"built tokenizer put {token} at id {got}, expected {want}")
    if tok.get_vocab_size(with_added_tokens=True) != vocab_size:
        raise RuntimeError("built tokenizer does not have the requested vocab size")

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"), pretty=False)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
