"""`python -m deployments.prepare_model`: prepares the embedded model into the cache.

Idempotent and quick when the folder is already there (torch is not even imported).
"""

from __future__ import annotations

import logging
import sys

from deployments.model_source import embedded_model_folder, is_prepared_folder


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    folder = embedded_model_folder()
    if not is_prepared_folder(folder):
        from deployments.transformers_engine import prepare_embedded_model

        prepare_embedded_model(folder)
    print(f"embedded model ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
