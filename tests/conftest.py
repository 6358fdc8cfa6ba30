"""Settings shared by every test: no test talks to anything but 127.0.0.1."""

import os

# Flower's start_server/start_client send anonymous usage events to Flower's servers by
# default. Tests (and the processes they start, which inherit this) must stay offline.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
