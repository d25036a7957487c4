"""The one exception hierarchy of openherd.

Every error a user can cause is a ``HerdError``. Each carries a message the user
can act on, an HTTP status and an OpenAI error ``type``/``code``. The CLI turns
any ``HerdError`` into one line on stderr and a non-zero exit code
(``cli.main``); the server turns it into an OpenAI-shaped error body
(``server.app``). Nothing else should catch and reformat these.

    HerdError
    ├── InvalidRequest          400  bad parameters, bad JSON, bad names
    │   ├── InvalidName         400  a model/persona name that could escape the store
    │   ├── ContextOverflow     400  prompt + max_tokens exceed the context window
    │   ├── Unsupported         400  the serving backend lacks a capability (names both)
    │   └── TaskError           400  a malformed eval task/samples file (names file:line)
    ├── InvalidModelFile        400  a GGUF/safetensors file that fails validation
    ├── AuthError               401  missing or wrong API key
    ├── Forbidden               403  foreign Host/Origin (DNS rebinding)
    ├── ModelNotFound           404  unknown model; suggests `herd pull`
    ├── NotFound                404  any other unknown resource
    ├── PayloadTooLarge         413
    ├── GateFailed              422  a tuned model regressed beyond the eval gate; not registered
    ├── QueueFull               429  carries retry_after seconds
    ├── Unavailable             503  server shutting down / model failed to load
    │   └── SandboxUnavailable  503  no way to isolate model-written code on this host
    ├── OfflineError            503  a download needed the network and it was not there
    └── StoreError              500  the store itself is broken (disk full, corrupt manifest)
"""

from __future__ import annotations


class HerdError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    exit_code: int = 1

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_openai(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class InvalidRequest(HerdError):
    status = 400
    type = "invalid_request_error"


class InvalidName(InvalidRequest):
    code = "invalid_name"


class ContextOverflow(InvalidRequest):
    code = "context_length_exceeded"


class Unsupported(InvalidRequest):
    """A request needs a capability the serving backend does not have (engine.backend.require)."""

    code = "unsupported_capability"


class TaskError(InvalidRequest):
    code = "invalid_task"


class InvalidModelFile(HerdError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_model_file"


class AuthError(HerdError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(HerdError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotFound(HerdError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, name: str, message: str | None = None):
        super().__init__(message or f"model '{name}' not found; try `herd pull {name}`", param="model")
        self.name = name


class NotFound(HerdError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class PayloadTooLarge(HerdError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class GateFailed(HerdError):
    """A tuned model regressed beyond the gate's threshold; it was not registered."""

    status = 422
    type = "invalid_request_error"
    code = "regression_gate_failed"


class QueueFull(HerdError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str = "server is busy: the request queue is full; retry shortly", retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(HerdError):
    status = 503
    type = "server_error"
    code = "unavailable"


class SandboxUnavailable(Unavailable):
    code = "sandbox_unavailable"


class OfflineError(HerdError):
    status = 503
    type = "server_error"
    code = "offline"


class StoreError(HerdError):
    status = 500
    type = "server_error"
    code = "store_error"
