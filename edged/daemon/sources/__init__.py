"""Sources turn files on disk into committed outbox entries, then retire the files."""
