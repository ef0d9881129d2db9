"""Device profiles and predictions for devices we don't have.

>>> dev = edgeslim.devices.get_device("raspberry-pi-4")
>>> cal = edgeslim.devices.calibrate([("small_cnn", artifact, measured_ms)])
>>> edgeslim.devices.predict_latency(artifact, dev, cal)["latency_ms"]   # "predicted for raspberry-pi-4"
>>> print(edgeslim.devices.preflight(artifact, "coral-edgetpu"))

Never imports compression techniques.
"""

from edgeslim.devices._cost import GraphCost, graph_cost
from edgeslim.devices._energy import HOROWITZ_SOURCE, estimate_energy, measure_energy, memory_fit, rapl_paths
from edgeslim.devices._host import add_device_predictions
from edgeslim.devices._preflight import Preflight, preflight
from edgeslim.devices._profile import Device, device_names, get_device, load_profile
from edgeslim.devices._roofline import DEFAULT_CALIBRATION, Calibration, calibrate, predict_latency

__all__ = [
    "DEFAULT_CALIBRATION",
    "HOROWITZ_SOURCE",
    "Calibration",
    "Device",
    "GraphCost",
    "Preflight",
    "add_device_predictions",
    "calibrate",
    "device_names",
    "estimate_energy",
    "get_device",
    "graph_cost",
    "load_profile",
    "measure_energy",
    "memory_fit",
    "predict_latency",
    "preflight",
    "rapl_paths",
]
