"""One error hierarchy for everything that ends in an HTTP error response.

Each class carries the status it answers with; the connection turns any
HttpError into that response and then closes (after an error the request
stream cannot be trusted to stay in sync).
"""


class HttpError(Exception):
    status = 500

    def __init__(self, detail: str = ""):
        super().__init__(detail or self.__class__.__doc__)
        self.detail = detail or (self.__class__.__doc__ or "").strip()


class BadRequest(HttpError):
    """Malformed request."""
    status = 400


class RequestTimeout(HttpError):
    """The request was not complete in time."""
    status = 408


class BodyTooLarge(HttpError):
    """Request body larger than max_body."""
    status = 413


class RequestLineTooLong(HttpError):
    """Request line longer than max_request_line."""
    status = 414


class HeadersTooLarge(HttpError):
    """Too many request headers, or too large."""
    status = 431


class NotImplementedMethod(HttpError):
    """A valid method token that this server does not implement (RFC 9110 9.1)."""
    status = 501


class VersionNotSupported(HttpError):
    """An HTTP major version other than 1."""
    status = 505


class UnsupportedTransferCoding(HttpError):
    """The request uses a transfer coding the server cannot decode."""
    status = 501


class SpoolFailed(HttpError):
    """The request body could not be stored (disk full, spool directory gone)."""
    status = 507


class AppError(HttpError):
    """The application failed."""
    status = 500
    logged = False   # set on instances whose cause (a traceback) is already logged
