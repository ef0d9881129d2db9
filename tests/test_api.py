import subprocess
import sys

import edgeslim


def test_public_surface_is_pinned():
    assert sorted(edgeslim.__all__) == sorted(
        [
            "Artifact",
            "Budget",
            "BudgetConfig",
            "ClusterConfig",
            "ConfigError",
            "DataError",
            "DistillConfig",
            "EdgeslimError",
            "ExportError",
            "FactorizeConfig",
            "Figure",
            "Metrics",
            "ModelError",
            "NASConfig",
            "OutputExistsError",
            "PruneConfig",
            "QuantConfig",
            "QuantizationError",
            "QuantizedModel",
            "RuntimeBackendError",
            "SeparableConfig",
            "Space",
            "TieConfig",
            "TrainConfig",
            "ValidationFloors",
            "__version__",
            "cluster",
            "data",
            "devices",
            "distill",
            "export",
            "factorize",
            "load",
            "measure",
            "models",
            "nas",
            "optimize",
            "prune",
            "quantize",
            "report",
            "save",
            "search_widths",
            "separable",
            "share",
            "tie_layers",
        ]
    )
    for name in (
        "quantize",
        "export",
        "measure",
        "report",
        "prune",
        "distill",
        "cluster",
        "tie_layers",
        "factorize",
        "separable",
        "save",
        "load",
    ):
        assert callable(getattr(edgeslim, name)), name


def test_import_stays_light():
    # optional and heavy backends load only when a verb needs them (torch itself is the one heavy import)
    code = (
        "import sys, torch; before = set(sys.modules); import edgeslim; "
        "heavy = [m for m in ('onnx', 'onnxruntime', 'yaml', 'sklearn', 'mlxtend', 'nncf', 'openvino', "
        "'onnxconverter_common', 'PIL', 'tqdm', 'torch_pruning', 'transformers', 'optuna', 'sqlalchemy') if m in sys.modules and m not in before]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"import edgeslim pulled in: {out}"


def test_errors_form_one_tree():
    for name in (
        "ConfigError",
        "DataError",
        "ExportError",
        "ModelError",
        "OutputExistsError",
        "QuantizationError",
        "RuntimeBackendError",
    ):
        assert issubclass(getattr(edgeslim, name), edgeslim.EdgeslimError)
