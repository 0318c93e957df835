"""The ingest Lambda under moto: a CloudWatch Logs client, and what the Lambda wrote and published."""

from __future__ import annotations

import json

import pytest

from windfleet.cloud import ingest

REGION = "us-east-1"


@pytest.fixture
def logs_client(monkeypatch):
    import boto3
    import moto

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    # The handler builds its iot-data client from the provisioned endpoint (a cold start each test);
    # moto serves the data plane on its generic host only, so that is the endpoint here.
    monkeypatch.setenv(ingest.IOT_DATA_ENDPOINT_ENV, f"data-ats.iot.{REGION}.amazonaws.com")
    monkeypatch.setattr(ingest, "_iot_data_client", None)
    with moto.mock_aws():
        yield boto3.client("logs", region_name=REGION)


def published_acks() -> list[tuple[str, dict]]:
    """What the Lambda published on moto's IoT data plane: (topic, payload)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iotdata.models import iotdata_backends

    return [(topic, json.loads(payload))
            for topic, payload in iotdata_backends[DEFAULT_ACCOUNT_ID][REGION].published_payloads]


def log_events(logs_client, group: str) -> list[dict]:
    """The Lambda's events in ``group``, each with its ``@stream`` and ``@ts``."""
    out = logs_client.filter_log_events(logGroupName=group)["events"]
    return [json.loads(e["message"]) | {"@stream": e["logStreamName"], "@ts": e["timestamp"]} for e in out]
