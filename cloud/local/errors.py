"""botocore-shaped errors for the local backend.

The local clients raise ``botocore.exceptions.ClientError`` subclasses with the
same ``response['Error']['Code']`` the service uses, so one ``except`` clause
serves both backends::

    try:
        gg.create_component_version(inlineRecipe=recipe)
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "ConflictException":
            raise

``client.exceptions.ConflictException`` works too, as on a boto3 client.
"""

from __future__ import annotations

from types import SimpleNamespace

from botocore.exceptions import ClientError

_STATUS = {
    "ConflictException": 409,
    "ResourceNotFoundException": 404,
    "ValidationException": 400,
    "NoSuchKey": 404,
    "NoSuchBucket": 404,
    "404": 404,
    "BucketAlreadyOwnedByYou": 409,
}


def _make(code: str) -> type[ClientError]:
    return type(code, (ClientError,), {})


_CLASSES = {code: _make(code) for code in _STATUS}


def client_error(code: str, message: str, operation: str) -> ClientError:
    """A ClientError as botocore would raise it for ``operation``."""
    cls = _CLASSES.get(code, ClientError)
    response = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": _STATUS.get(code, 400)},
    }
    return cls(response, operation)


def exceptions_namespace(*codes: str) -> SimpleNamespace:
    """``client.exceptions``: the modeled exception classes by name."""
    ns = {code: _CLASSES[code] for code in codes}
    ns["ClientError"] = ClientError
    return SimpleNamespace(**ns)
