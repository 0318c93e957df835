"""A loopback S3 endpoint for the local backend: boto3 with ``endpoint_url`` -> :class:`LocalS3`.

Serves what devices and tools call with a plain ``boto3.client("s3", endpoint_url=...)``,
path-style: PutObject, GetObject, HeadObject and ListObjectsV2 (prefix, max-keys,
continuation token, ``encoding-type=url``), over the same files the local backend reads
(``<home>/s3/<bucket>/<key>``), so what a forwarder uploads here is what
``windfleet train --from-capture s3://...`` reads with ``Backend.local()``.

Every request must carry an AWS Signature Version 4 made with credentials that the local
token exchange service issued (:class:`windfleet.nucleus.tes.CredentialAuthority`, keyed
in the same home): other credentials are refused with S3's own errors
(``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, 403), as are a missing signature
(``AccessDenied``) and a body that does not match its signed hash.  The signature is
recomputed with botocore's own signer.

Run it with ``windfleet cloud s3-endpoint`` or, in process, ``S3Endpoint(home).start()``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from windfleet import jsonlog
from windfleet.loopback import LoopbackServer
from windfleet.nucleus.tes import CredentialAuthority

from ..settings import BUCKET
from .s3 import LocalS3
from .store import Store

log = logging.getLogger("windfleet.cloud.s3_endpoint")

_AUTH = re.compile(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/s3/aws4_request,\s*"
                   r"SignedHeaders=([^,]+),\s*Signature=([0-9a-f]{64})")
_UNSIGNED = ("UNSIGNED-PAYLOAD",)
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
MAX_BODY = 256 * 1024 * 1024


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def check_signature(method: str, path: str, headers: dict[str, str], body: bytes,
                    authority: CredentialAuthority) -> str:
    """The access key id of a correctly signed request; S3Error otherwise."""
    match = _AUTH.fullmatch(headers.get("authorization", "").strip())
    if match is None:
        raise S3Error(403, "AccessDenied", "Requests must be signed with AWS Signature Version 4")
    access_key, _day, region, signed, signature = match.groups()
    token = headers.get("x-amz-security-token")
    secret = authority.secret_for(access_key, token)
    if secret is None:
        raise S3Error(403, "InvalidAccessKeyId",
                      "The AWS Access Key Id you provided does not exist in our records (or has expired).")
    content_hash = headers.get("x-amz-content-sha256", "")
    if content_hash not in _UNSIGNED and not hmac.compare_digest(content_hash, hashlib.sha256(body).hexdigest()):
        raise S3Error(400, "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match")
    names = signed.split(";")
    if any(n not in headers for n in names) or "x-amz-date" not in headers:
        raise S3Error(403, "SignatureDoesNotMatch", "a signed header is missing")
    request = AWSRequest(method=method, url=f"http://{headers.get('host', 'localhost')}{path}",
                         headers={n: headers[n] for n in names}, data=body)
    request.context["timestamp"] = headers["x-amz-date"]
    signer = S3SigV4Auth(Credentials(access_key, secret, token), "s3", region)
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    if not hmac.compare_digest(expected, signature):
        raise S3Error(403, "SignatureDoesNotMatch",
                      "The request signature we calculated does not match the signature you provided.")
    return access_key


class S3Endpoint(LoopbackServer):
    """The HTTP server.  ``home``: the local backend's store (a :class:`Store` or its directory)."""

    thread_name = "s3-endpoint"

    def __init__(self, home: Store | str | Path | None = None, host: str = "127.0.0.1", port: int = 0):
        self.store = home if isinstance(home, Store) else Store(home)
        self.s3 = LocalS3(self.store)
        (self.store.objects / BUCKET).mkdir(exist_ok=True)  # as Backend.local(): the bucket always exists
        self.authority = CredentialAuthority(self.store.home)
        self.counters = {"requests": 0, "refused": 0, "objects_put": 0}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # boto3 sends Expect: 100-continue on PutObject

            def _serve(self) -> None:
                endpoint.handle(self)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _serve

            def log_message(self, *_args) -> None:
                pass

        super().__init__(Handler, host, port)

    @property
    def url(self) -> str:
        """The ``endpoint_url`` to give boto3 (and the forwarder's ``capture_endpoint``)."""
        host, port = self.address
        return f"http://{host}:{port}"

    def start(self) -> "S3Endpoint":
        """Serve on a daemon thread; returns self."""
        super().start()
        jsonlog.event(log, "S3 endpoint listening", url=self.url, home=str(self.store.home))
        return self

    def serve_forever(self) -> None:
        jsonlog.event(log, "S3 endpoint listening", url=self.url, home=str(self.store.home))
        super().serve_forever()

    # ------------------------------------------------------------ requests
    def handle(self, req: BaseHTTPRequestHandler) -> None:
        self.counters["requests"] += 1
        headers = {k.lower(): v for k, v in req.headers.items()}
        try:
            length = int(headers.get("content-length") or 0)
            if length < 0 or length > MAX_BODY:
                raise S3Error(400, "EntityTooLarge", "body too large")
            body = req.rfile.read(length) if length else b""
            check_signature(req.command, req.path, headers, body, self.authority)
            status, out_headers, data = self.dispatch(req.command, req.path, headers, body)
        except S3Error as exc:
            self.counters["refused"] += exc.status in (400, 403)
            status, out_headers, data = exc.status, {"Content-Type": "application/xml"}, _error_xml(exc.code, exc.message)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "InternalError"))
            status = 404 if code in ("NoSuchKey", "NoSuchBucket", "404") else 400
            status, out_headers, data = status, {"Content-Type": "application/xml"}, _error_xml(
                "NoSuchKey" if code == "404" else code, str(error.get("Message", "")))
        except Exception as exc:  # noqa: BLE001 - a bug here is a 500 for the client, not a dead server
            jsonlog.event(log, "S3 endpoint error", logging.ERROR, error=repr(exc)[:300])
            status, out_headers, data = 500, {"Content-Type": "application/xml"}, _error_xml("InternalError", "")
        req.send_response(status)
        for name, value in out_headers.items():
            req.send_header(name, value)
        req.send_header("Date", formatdate(usegmt=True))
        # one request per connection: close() then really takes the endpoint away (an open
        # keep-alive connection would go on being served by its thread)
        req.send_header("Connection", "close")
        req.close_connection = True
        if "Content-Length" not in out_headers:
            req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if req.command != "HEAD":
            req.wfile.write(data)

    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes
                 ) -> tuple[int, dict[str, str], bytes]:
        parts = urlsplit(raw_path)
        bucket, _, key = unquote(parts.path).lstrip("/").partition("/")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if not bucket:
            raise S3Error(400, "InvalidRequest", "path-style requests only: /bucket/key")
        if method == "PUT" and key:
            etag = self.s3.put_object(Bucket=bucket, Key=key, Body=body)["ETag"]
            self.counters["objects_put"] += 1
            return 200, {"ETag": etag}, b""
        if method in ("GET", "HEAD") and key:
            meta = (self.s3.get_object if method == "GET" else self.s3.head_object)(Bucket=bucket, Key=key)
            data = meta["Body"].read() if method == "GET" else b""
            return 200, {"ETag": meta["ETag"], "Content-Length": str(meta["ContentLength"]),
                         "Content-Type": "binary/octet-stream",
                         "Last-Modified": formatdate(meta["LastModified"].timestamp(), usegmt=True)}, data
        if method == "GET" and query.get("list-type") == "2":
            return 200, {"Content-Type": "application/xml"}, self._list(bucket, query)
        raise S3Error(501, "NotImplemented", f"{method} {parts.path} is not served by the local S3 endpoint")

    def _list(self, bucket: str, query: dict[str, str]) -> bytes:
        prefix = query.get("prefix", "")
        max_keys = max(0, min(1000, int(query.get("max-keys", "1000") or 1000)))
        after = query.get("continuation-token") or query.get("start-after") or ""
        contents = [c for c in self.s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"] if c["Key"] > after]
        page, truncated = contents[:max_keys], len(contents) > max_keys
        encode = (lambda s: quote(s, safe="/")) if query.get("encoding-type") == "url" else (lambda s: s)
        items = []
        for c in page:
            stamp = datetime.fromtimestamp(self.s3.path(bucket, c["Key"]).stat().st_mtime, timezone.utc)
            items.append(f"<Contents><Key>{escape(encode(c['Key']))}</Key>"
                         f"<LastModified>{stamp.strftime('%Y-%m-%dT%H:%M:%S.000Z')}</LastModified>"
                         f"<Size>{c['Size']}</Size><StorageClass>STANDARD</StorageClass></Contents>")
        xml = (f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{_NS}"><Name>{escape(bucket)}</Name>'
               f"<Prefix>{escape(encode(prefix))}</Prefix><KeyCount>{len(page)}</KeyCount><MaxKeys>{max_keys}</MaxKeys>"
               + ("<EncodingType>url</EncodingType>" if query.get("encoding-type") == "url" else "")
               + f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
               + (f"<NextContinuationToken>{escape(page[-1]['Key'])}</NextContinuationToken>" if truncated else "")
               + "".join(items) + "</ListBucketResult>")
        return xml.encode()


def _error_xml(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message></Error>").encode()


def main(home: str | Path | None = None, host: str = "127.0.0.1", port: int = 0, **_: Any) -> None:
    """Serve until interrupted (``windfleet cloud s3-endpoint``)."""
    endpoint = S3Endpoint(home, host, port)
    print(endpoint.url, flush=True)  # noqa: T201 - the one line a caller reads
    try:
        endpoint.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        endpoint.close()
