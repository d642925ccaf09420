"""The ROCm backend tests' fixtures (support/rocm_harness.py): ``rocm``, the backend on a
fake box, and ``plugin_log``, the plugin's log records."""

from support.rocm_harness import plugin_log, rocm  # noqa: F401 - fixtures, found by pytest here
