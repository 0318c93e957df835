"""com.windfleet.LogForwarder: batches scores, anomalies, health and logs to the cloud,
spooling to a bounded SQLite file while offline (policy when full: drop oldest, counted)."""

from .forwarder import COMPONENT, Forwarder, run
from .spool import Spool

__all__ = ["COMPONENT", "Forwarder", "Spool", "run"]
