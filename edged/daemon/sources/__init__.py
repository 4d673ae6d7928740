"""Sources turn files on disk into committed outbox entries, then retire the files.

Importing the package registers every kind (each module's last lines): the config
reader and the daemon find them in `base.KINDS`, and name none of them.
"""

from edged.daemon.sources import capture, files, jsonl

__all__ = ["capture", "files", "jsonl"]
