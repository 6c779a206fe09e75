"""``python -m edgetrain.fleet CONFIG.json OUT``: the simulation engine's child process (see
:func:`edgetrain.fleet.engine.run_simulation_engine`; users run ``edgetrain fleet``)."""

import sys
from pathlib import Path

from edgetrain.fleet.config import FleetConfig
from edgetrain.fleet.engine import simulate

if len(sys.argv) != 3:
    sys.exit("usage: python -m edgetrain.fleet CONFIG.json OUT (use `edgetrain fleet` instead)")
simulate(FleetConfig.load(sys.argv[1]), Path(sys.argv[2]))
