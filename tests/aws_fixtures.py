"""moto for the AWS paths: fake credentials in the environment (never a real profile), then
``mock_aws`` and a :class:`Backend` on it.  One place, so every AWS test isolates the same way."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from moto import mock_aws

from windfleet.cloud.backends import Backend

FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "t"}


def fake_aws_env(monkeypatch, region: str) -> None:
    """Fake credentials and ``region`` for boto3; no ``AWS_PROFILE`` can point at a real account."""
    for k, v in {**FAKE_CREDENTIALS, "AWS_DEFAULT_REGION": region}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@contextmanager
def moto_backend(monkeypatch, region: str, **names: str) -> Iterator[Backend]:
    """``Backend.aws(region=region, **names)`` inside ``mock_aws``."""
    fake_aws_env(monkeypatch, region)
    with mock_aws():
        yield Backend.aws(region=region, **names)
