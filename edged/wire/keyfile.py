"""Where API keys come from: the environment or a file only its owner can read.

Keys never come from config values or the command line (they would land in `ps`,
shell history and logs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edged.errors import ConfigError

API_KEY_ENV = "EDGED_API_KEY"


def read_secret_file(path: Path) -> str:
    """First line of `path`, refusing a file that group or others could read."""
    try:
        st = path.stat()
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read API key file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"API key file {path} is not UTF-8 text") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(
            f"API key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; "
            "it must not be readable by group or others (chmod 600)"
        )
    lines = text.strip().splitlines()
    if not lines:
        raise ConfigError(f"API key file {path} is empty")
    return lines[0].strip()


def resolve_api_key(path: Path | None, env_var: str = API_KEY_ENV) -> str | None:
    """The environment wins over the file, so a unit can inject a key without a file."""
    value = os.environ.get(env_var, "").strip()
    if value:
        return value
    return read_secret_file(path) if path is not None else None


def api_key(key_id: str | None, path: Path | None, env_var: str = API_KEY_ENV) -> str | None:
    """The key `edged run` authenticates with, or None to connect without one; raises
    ConfigError (as run and check-config report it) when it cannot be had."""
    secret = resolve_api_key(path, env_var)
    if key_id and secret is None:
        raise ConfigError(
            f"cloud.api_key_id is set but no key was found: set cloud.api_key_file or {env_var}"
        )
    return secret
