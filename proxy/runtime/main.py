"""The entry point of `weir run`: load the config, then serve as one process or as a
supervisor of workers."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from ..config.loader import load_config
from ..config.model import ConfigError
from ..config.tls import TLSConfigError
from ..dataplane.listen import ListenError
from .process import install_event_loop, raise_open_file_limit
from .single import serve

log = logging.getLogger("weir")


def run(config_path: str, workers: int = 1) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("watchfiles").setLevel(logging.WARNING)  # we log reloads ourselves
    raise_open_file_limit()
    install_event_loop()
    if workers > 1:
        from .supervisor import serve_supervised

        main = serve_supervised(Path(config_path), config, workers)
    else:
        main = serve(Path(config_path), config)
    try:
        return asyncio.run(main)
    except TLSConfigError as exc:  # a file changed since it was validated a moment ago
        print(ConfigError(config_path, exc.errors), file=sys.stderr)
        return 2
    except ListenError as exc:  # like an invalid config: exit 2, one line, nothing listens
        print(f"weir: {exc.message(config_path)}", file=sys.stderr)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
