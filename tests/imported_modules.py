"""Which modules of qlora_jax a run of the tests imported: run the tests with QLORA_JAX_IMPORTED_MODULES=FILE
(tests/conftest.py then has every test process, xdist workers included, add the qlora_jax modules it imported to
FILE), then

    python -m tests.imported_modules FILE

lists the package's modules that no test process imported, and exits 1 if there is one. Conservative: modules
imported only by the subprocesses some tests start (the CLI, the 8-device checks) are not counted.
"""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path


def package_modules() -> set[str]:
    """Every module of qlora_jax (packages included), found without importing them."""
    import qlora_jax

    return {info.name for info in pkgutil.walk_packages(qlora_jax.__path__, "qlora_jax.")} | {"qlora_jax"}


def main(path: str) -> int:
    imported = set(Path(path).read_text().split())
    modules = package_modules()
    left_out = sorted(modules - imported)
    print(f"{len(modules) - len(left_out)} of {len(modules)} qlora_jax modules imported by the tests")
    for name in left_out:
        print(f"  not imported: {name}")
    return 1 if left_out else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(
            "usage: python -m tests.imported_modules FILE (written by a test run with QLORA_JAX_IMPORTED_MODULES=FILE)"
        )
    sys.exit(main(sys.argv[1]))
