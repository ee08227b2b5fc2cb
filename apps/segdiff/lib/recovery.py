"""Recovery of a studies folder's datastore file after a crash of an older, non-atomic writer."""

from __future__ import annotations

import logging
import os
import time

from filelock import FileLock
from monailabel.datastore.local import LocalDatastoreModel

logger = logging.getLogger(__name__)


def set_aside_if_corrupt(path: str, lock_file: str) -> None:
    """Move an unparseable datastore file aside (``<name>.corrupt-<time>``): the datastore is then
    rebuilt from the files on disk (labels are files; image infos such as scores are recomputed)."""
    if not os.path.isfile(path):
        return
    with FileLock(lock_file):
        try:
            with open(path) as f:
                LocalDatastoreModel.model_validate_json(f.read())
            return
        except (OSError, ValueError) as e:
            aside = f"{path}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
            logger.error(f"datastore file {path} is unreadable ({str(e).splitlines()[0][:200]}); moved to {aside}")
            try:
                os.replace(path, aside)
            except FileNotFoundError:
                pass
