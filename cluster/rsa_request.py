"""Whether a chat request asks for an RSA run: its `rsa` object or Zyphra's flat rsa_* fields
(read on every chat request, so kept apart from the RSA handler)."""

from __future__ import annotations

from zayaserve.cluster.frontend_errors import InvalidRequestError, as_frontend_error
from zayaserve.cluster.openai_chat_protocol import ChatCompletionRequest
from zayaserve.replicas.rsa.params import FLAT_KEYS, RSAParams


def rsa_params_of(body: ChatCompletionRequest) -> RSAParams | None:
    """The run a chat request asks for (the `rsa` object or the flat aliases), or None."""
    try:
        flat = RSAParams.from_flat(body.model_extra or {})
    except ValueError as err:
        raise as_frontend_error(err) from None
    if flat is not None and body.rsa is not None:
        raise InvalidRequestError("rsa: give the rsa object or the flat rsa_* fields, not both",
                                  "rsa")
    return body.rsa or flat


def flat_renames(body: ChatCompletionRequest) -> dict[str, str]:
    """rsa.<field> -> the flat key the client used for it, so errors speak its terms."""
    return {f"rsa.{FLAT_KEYS[key]}": key for key in (body.model_extra or {})
            if key in FLAT_KEYS}
