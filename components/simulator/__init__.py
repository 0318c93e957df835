"""com.windfleet.TurbineSimulator: simulated turbines publishing readings and ground-truth labels.

    from windfleet.components.simulator import Simulator, SimConfig, run
"""

from .service import COMPONENT, ConfigError, SimConfig, Simulator, run

__all__ = ["COMPONENT", "ConfigError", "SimConfig", "Simulator", "run"]
