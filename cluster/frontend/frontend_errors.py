"""What a front end (REST or gRPC) answers a bad or failed request with: errors that name the
request field to blame and carry their HTTP status (gRPC maps it), and the mapping from what
the engine raises. The checks every endpoint makes before generating are `request_checks`."""

from __future__ import annotations

import logging

from zayaserve.replicas.engine.async_engine import (
    EngineDeadError,
    EngineOverloadedError,
    RequestFailedError,
    StreamStalledError,
)
from zayaserve.replicas.validation_errors import ParamError

logger = logging.getLogger("zayaserve.frontend")


class FrontendError(Exception):
    """A request the front end answers with an error. `status` is the HTTP code; gRPC maps it
    (see grpc_api). `param` names the offending request field, when one is to blame."""

    status = 400
    error_type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str] | None:
        if self.status == 401:
            return {"WWW-Authenticate": "Bearer"}
        if self.retry_after_s is not None:
            return {"Retry-After": str(self.retry_after_s)}
        return None


class InvalidRequestError(FrontendError):
    pass


class AuthenticationError(FrontendError):
    status = 401
    code = "invalid_api_key"


class PermissionDeniedError(FrontendError):
    status = 403
    error_type = "permission_error"
    code = "permission_denied"


class ModelNotFoundError(FrontendError):
    status = 404
    code = "model_not_found"


class NotFoundError(FrontendError):
    status = 404
    code = "not_found"


class ConflictError(FrontendError):
    status = 409
    code = "conflict"


class BodyTooLargeError(FrontendError):
    status = 413
    code = "request_too_large"


class OverloadedError(FrontendError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UnavailableError(FrontendError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"


class StalledStreamError(FrontendError):
    status = 408
    code = "stream_stalled"


class InternalServerError(FrontendError):
    status = 500
    error_type = "server_error"
    code = "internal_error"


def internal_error(err: BaseException, where: str) -> InternalServerError:
    """What a client is told of a failure that is not its fault: the class of what failed,
    never a traceback or a repr (those go to the log)."""
    logger.error("unexpected %s in %s", type(err).__name__, where, exc_info=err)
    return InternalServerError(f"internal error ({type(err).__name__}); see the server log")


def as_frontend_error(
    err: BaseException, renames: dict[str, str] | None = None, default_param: str | None = None
) -> FrontendError:
    """Maps what generation raises onto the error the client sees. `renames` translates engine
    field names into this API's (e.g. the engine's `prompt_token_ids` is REST's `prompt`).
    Anything that is not a request problem is re-raised, for the server's 500 path."""
    if isinstance(err, FrontendError):
        return err
    if isinstance(err, EngineOverloadedError):
        return OverloadedError(f"the server is overloaded, retry later ({err})",
                               retry_after_s=1)
    if isinstance(err, EngineDeadError):
        return UnavailableError(f"{err}; retry later", retry_after_s=1)
    if isinstance(err, RequestFailedError):
        if err.retryable:
            return UnavailableError(f"{err}: a peer it needs is unavailable; retry later",
                                    retry_after_s=1)
        return InternalServerError(str(err))
    if isinstance(err, StreamStalledError):
        return StalledStreamError(str(err))
    if isinstance(err, ValueError):  # a ParamError names its field; others get the default
        message = str(err)
        param = err.param if isinstance(err, ParamError) else default_param
        if param is not None and renames and param in renames:
            if message.startswith(param):  # say it in the client's terms
                message = renames[param] + message[len(param):]
            param = renames[param]
        if param is not None and not message.startswith(param):
            message = f"{param}: {message}"
        return InvalidRequestError(message, param)
    raise err
