"""The local MQTT broker: Mosquitto with per-device accounts and an ACL.

A :class:`Broker` owns one directory::

    data_dir/
      mosquitto.conf     generated on every start
      passwd             hashed with ``mosquitto_passwd -U``
      acl                one block per account
      credentials.json   the plain-text passwords (mode 0600): who may connect
      state.json         host, port and pid of the running broker (for other processes)
      mosquitto.db       persistence (QoS1 sessions survive broker restarts)
      mosquitto.log

Usage::

    with Broker(tmp / "broker", port=0) as broker:
        user, password = broker.add_device("gw1", ["gw1-t00", "gw1-t01"])
        ...

Access rules (DESIGN.md "The bus"): a device (user = its thing name) may publish
and subscribe only under ``windfleet/devices/{thing}/#``, ``windfleet/fleet/{thing}/#``
and ``windfleet/turbines/{turbine}/#`` for its own turbines.  The cloud account may
read and write ``windfleet/fleet/#`` and read everything.  Anonymous clients are refused.

Mosquitto checks the read ACL on every delivered message, also for wildcard
subscriptions: a device subscribing ``windfleet/turbines/+/scores`` is allowed to
subscribe but receives only its own turbines' messages (tests/test_broker.py checks
this).  Components still subscribe per turbine so the same code works on Greengrass
IPC, whose authorization is per subscription.

Denied publishes are logged by Mosquitto at its *debug* level only, together with
every message; ``verbose=True`` turns that on (tests do; a long fleet run should not).

Byte limits (IoT Core accepts publish payloads of at most 128 KB, so the stand-in does
not accept more):

* ``message_size_limit`` = :data:`MESSAGE_SIZE_LIMIT` (131,072 bytes of PUBLISH
  payload).  Mosquitto 2.x does not forward a larger message; for an MQTT 3.1.1 QoS 1
  publish it still completes the flow (the publisher gets its PUBACK and stays
  connected: 3.1.1 has no way to say "refused"), the subscribers never see it.  Mosquitto
  logs the drop at *debug* level only ("Dropped too large PUBLISH"), so it is counted
  only with ``verbose=True``: :meth:`Broker.limit_hits`.
* ``max_packet_size`` = :data:`MAX_PACKET_SIZE` (twice that, whole packet): a client that
  sends a larger packet is disconnected as soon as its length header is read, so a
  20 MB publish is never buffered.  Logged at *notice* level; :meth:`Broker.limit_hits`
  counts those disconnections always.  A QoS 1 client that persisted such a message
  re-sends it on reconnect and is disconnected again: the message can never pass.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

CLOUD_USER = "windfleet-cloud"
# IoT Core's limit on a publish payload ("128 KB"); the forwarder builds messages of at most
# ~96 KiB of records (components/forwarder), so a legitimate message never comes near it.
# Mosquitto writes queued QoS 1 sessions to disk this often: a crash (SIGKILL) loses what
# changed since the last save; an orderly stop (SIGTERM) saves first.
AUTOSAVE_INTERVAL_S = 5
MESSAGE_SIZE_LIMIT = 128 * 1024
# Whole MQTT packet (fixed header, topic, payload): a publish beyond this disconnects its client.
MAX_PACKET_SIZE = 2 * MESSAGE_SIZE_LIMIT
MOSQUITTO = os.environ.get("WINDFLEET_MOSQUITTO", shutil.which("mosquitto") or "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


class BrokerError(RuntimeError):
    """Mosquitto could not be started or reloaded; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (bind to port 0 and let the OS choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (our own un-reaped child) is not alive.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    # Write-then-rename so a concurrent reader (mosquitto on SIGHUP, another
    # windfleet process) never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class Broker:
    """A Mosquitto process with windfleet's accounts and ACL.

    :param data_dir: where config, credentials, persistence and the log live.
    :param port: TCP port; ``0`` picks a free one at the first start (kept across restarts).
    :param host: address to listen on (loopback by default).
    :param verbose: log every packet (needed to see ACL denials in the log).
    """

    def __init__(self, data_dir: str | os.PathLike, port: int = 1883, host: str = "127.0.0.1",
                 verbose: bool = False):
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.port = port or free_port(host)
        self.verbose = verbose
        self._proc: subprocess.Popen | None = None
        self._log_fh = None

    # ------------------------------------------------------------ paths
    @property
    def log_path(self) -> Path:
        return self.data_dir / "mosquitto.log"

    @property
    def conf_path(self) -> Path:
        return self.data_dir / "mosquitto.conf"

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------ attach
    @classmethod
    def attach(cls, data_dir: str | os.PathLike) -> "Broker | None":
        """A handle on a broker another process runs from ``data_dir``, or None.

        ``add_device`` on the handle rewrites the files and signals that process.
        """
        state_file = Path(data_dir) / "state.json"
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            return None
        if not _pid_alive(int(state["pid"])) or not _listening(state["host"], int(state["port"])):
            return None
        return cls(data_dir, port=int(state["port"]), host=state["host"])

    # ------------------------------------------------------------ credentials
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """credentials.json, read-modify-written under an flock (several processes may add devices)."""
        with open(self.data_dir / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.data_dir / "credentials.json"
            creds = json.loads(path.read_text()) if path.exists() else {}
            creds.setdefault("cloud", {"user": CLOUD_USER, "password": secrets.token_urlsafe(18)})
            creds.setdefault("devices", {})
            before = json.dumps(creds, sort_keys=True)
            yield creds
            if json.dumps(creds, sort_keys=True) != before or not path.exists():
                _write_atomic(path, json.dumps(creds, indent=2, sort_keys=True))
            self._write_auth_files(creds)

    def _read_credentials(self) -> dict:
        path = self.data_dir / "credentials.json"
        if not path.exists():
            with self._locked() as creds:
                return creds
        return json.loads(path.read_text())

    def credentials(self, thing: str) -> tuple[str, str]:
        """(user, password) of a device added with :meth:`add_device`; KeyError otherwise."""
        device = self._read_credentials()["devices"][thing]
        return thing, device["password"]

    def cloud_credentials(self) -> tuple[str, str]:
        cloud = self._read_credentials()["cloud"]
        return cloud["user"], cloud["password"]

    def add_device(self, thing: str, turbines: Iterable[str] | int = (),
                   password: str | None = None) -> tuple[str, str]:
        """Create (or update) the account of ``thing`` with access to ``turbines``.

        ``turbines`` is a list of turbine ids (or a count, expanded with
        ``topics.turbine_id``).  An existing password is kept unless ``password``
        is given (a test's second broker can then accept the same device).
        The running broker reloads its password file and ACL (SIGHUP).
        """
        if not thing or any(c in thing for c in "/+#: \n") or thing == CLOUD_USER:
            raise ValueError(f"invalid thing name {thing!r}")
        if isinstance(turbines, int):
            from windfleet import topics
            turbines = [topics.turbine_id(thing, i) for i in range(turbines)]
        turbines = sorted(set(turbines))
        for turbine in turbines:
            if not turbine or any(c in turbine for c in "/+#"):
                raise ValueError(f"invalid turbine id {turbine!r}")
        with self._locked() as creds:
            device = creds["devices"].setdefault(thing, {"password": secrets.token_urlsafe(18)})
            if password is not None:
                device["password"] = password
            device["turbines"] = turbines
            result = (thing, device["password"])
        self.reload()
        return result

    def _write_auth_files(self, creds: dict) -> None:
        accounts = {creds["cloud"]["user"]: creds["cloud"]["password"]}
        accounts.update({thing: dev["password"] for thing, dev in creds["devices"].items()})
        # Plain "user:password" lines hashed in place by one mosquitto_passwd -U call
        # (one process for the whole fleet instead of one per device).
        passwd = self.data_dir / "passwd"
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".passwd.")
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{user}:{pw}\n" for user, pw in sorted(accounts.items())))
        try:
            subprocess.run([MOSQUITTO_PASSWD, "-U", tmp], check=True, capture_output=True, timeout=60)
            os.replace(tmp, passwd)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)

        lines = [
            "# generated by windfleet.nucleus.broker; edits are overwritten",
            f"user {creds['cloud']['user']}",
            "topic read #",
            "topic readwrite windfleet/fleet/#",
            "",
        ]
        for thing, dev in sorted(creds["devices"].items()):
            lines += [
                f"user {thing}",
                f"topic readwrite windfleet/devices/{thing}/#",
                f"topic readwrite windfleet/fleet/{thing}/#",
                *(f"topic readwrite windfleet/turbines/{t}/#" for t in dev.get("turbines", [])),
                "",
            ]
        _write_atomic(self.data_dir / "acl", "\n".join(lines))

    # ------------------------------------------------------------ config
    def _write_config(self) -> None:
        log_types = ["all"] if self.verbose else ["error", "warning", "notice", "information"]
        conf = [
            "# generated by windfleet.nucleus.broker; edits are overwritten",
            # Started as root, mosquitto would switch to the 'mosquitto' user and then
            # fail to read our root-only password file.
            "user root",
            "per_listener_settings false",
            f"listener {self.port} {self.host}",
            "allow_anonymous false",
            f"password_file {self.data_dir / 'passwd'}",
            f"acl_file {self.data_dir / 'acl'}",
            # Persistent sessions: QoS1 subscribers with clean_session=False miss nothing
            # across their own restarts and across a clean broker restart.
            "persistence true",
            f"persistence_location {self.data_dir}/",
            "persistence_file mosquitto.db",
            f"autosave_interval {AUTOSAVE_INTERVAL_S}",
            "max_queued_messages 200000",
            "max_inflight_messages 100",
            "persistent_client_expiration 7d",
            # Byte limits (module docstring): dropped above 128 KiB, disconnected above 256 KiB.
            f"message_size_limit {MESSAGE_SIZE_LIMIT}",
            f"max_packet_size {MAX_PACKET_SIZE}",
            f"pid_file {self.data_dir / 'mosquitto.pid'}",
            f"log_dest file {self.log_path}",
            *(f"log_type {t}" for t in log_types),
            "connection_messages true",
            "log_timestamp true",
            "",
        ]
        _write_atomic(self.conf_path, "\n".join(conf), mode=0o644)

    # ------------------------------------------------------------ lifecycle
    @property
    def pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        try:
            state = json.loads((self.data_dir / "state.json").read_text())
            return int(state["pid"]) if _pid_alive(int(state["pid"])) else None
        except (OSError, ValueError, KeyError):
            return None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 15.0) -> "Broker":
        """Generate the files, start Mosquitto and return once it accepts connections."""
        if self._proc is not None and self._proc.poll() is None:
            return self
        if _listening(self.host, self.port):
            raise BrokerError(f"mosquitto did not start: {self.url} is already in use")
        with self._locked():
            pass  # make sure credentials, passwd and acl exist
        self._write_config()
        self._log_fh = open(self.data_dir / "mosquitto.stderr", "ab")
        self._proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf_path)],
            stdout=self._log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in a terminal goes to us, we stop it cleanly
        )
        deadline = time.monotonic() + timeout
        # Listening AND still alive: a process that failed to bind exits.
        while not _listening(self.host, self.port) or self._proc.poll() is not None:
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise BrokerError(f"mosquitto did not start on {self.url}: {tail}")
            time.sleep(0.05)
        _write_atomic(self.data_dir / "state.json",
                      json.dumps({"host": self.host, "port": self.port, "pid": self._proc.pid}), 0o644)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Mosquitto saves its persistence file), SIGKILL after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        with contextlib.suppress(OSError):
            (self.data_dir / "state.json").unlink()

    def kill(self) -> None:
        """SIGKILL, as a crash would (no persistence save)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """Make a running Mosquitto re-read the password file and ACL (SIGHUP)."""
        pid = self.pid
        if pid is not None:
            os.kill(pid, signal.SIGHUP)

    def limit_hits(self) -> dict[str, int]:
        """How often the byte limits were hit, read from Mosquitto's log:
        ``dropped_too_large`` (payload over ``message_size_limit``; logged by Mosquitto only
        with ``verbose=True``) and ``disconnected_oversize`` (packet over ``max_packet_size``)."""
        hits = {"dropped_too_large": 0, "disconnected_oversize": 0}
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as fh:
            for line in fh:
                if "Dropped too large PUBLISH" in line:
                    hits["dropped_too_large"] += 1
                elif "disconnected due to oversize packet" in line:
                    hits["disconnected_oversize"] += 1
        return hits

    def _log_tail(self, n: int = 2000) -> str:
        text = ""
        for path in (self.data_dir / "mosquitto.stderr", self.log_path):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")[-n:]
        return text.strip() or "(no output)"

    def __enter__(self) -> "Broker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Broker({str(self.data_dir)!r}, port={self.port}, host={self.host!r})"


def serve(data_dir: str | os.PathLike, port: int = 1883, host: str = "127.0.0.1",
          verbose: bool = False) -> None:
    """Run the broker in the foreground until Ctrl-C or SIGTERM (``windfleet broker``)."""
    stop = {"flag": False}

    def _stop(signum, frame):  # noqa: ARG001
        stop["flag"] = True

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = Broker(data_dir, port=port, host=host, verbose=verbose)
    try:
        broker.start()
        user, _ = broker.cloud_credentials()
        print(json.dumps({"msg": "broker listening", "url": broker.url, "data_dir": str(broker.data_dir),
                          "cloud_user": user, "credentials": str(broker.data_dir / "credentials.json"),
                          "log": str(broker.log_path)}), flush=True)
        while not stop["flag"]:
            if broker._proc is None or broker._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited: {broker._log_tail()}")
            time.sleep(0.2)
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


main = serve
