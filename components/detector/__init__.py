"""com.windfleet.AnomalyDetector: scores turbine readings with the model package on the device.

    from windfleet.components.detector import Detector, run, load_model
"""

from .model import LoadedModel, ModelRejected, load_model
from .service import COMPONENT, Detector, run

__all__ = ["COMPONENT", "Detector", "LoadedModel", "ModelRejected", "load_model", "run"]
