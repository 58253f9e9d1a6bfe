import sys

try:
    from .cli.commands import main
except KeyboardInterrupt:  # Ctrl-C while still importing: no traceback, the usual code
    sys.exit(130)

sys.exit(main())
