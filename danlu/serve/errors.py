"""The error a request answers with, in OpenAI's shape (status, message, type, param, code)."""
from __future__ import annotations


class APIError(Exception):
    def __init__(self, status, message, type=None, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ERROR_TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}


# OpenAI's error types: 4xx the client can fix are invalid_request_error (model_not_found included),
# a missing key authentication_error; overload and failures on the server's side are server_error
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
               499: "invalid_request_error", 503: "server_error", 504: "server_error", 500: "server_error"}
CLOSE = {"Connection": "close"}  # on a 500: the connection may be in any state; the client opens a new one
