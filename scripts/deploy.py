"""fedpriv on a real Flower deployment on this machine: a SuperLink and N SuperNodes on 127.0.0.1.

    python scripts/deploy.py run --nodes 3 --mode tls+auth -- privacy=central num_rounds=3   # up + run + down
    python scripts/deploy.py up --nodes 3 --mode tls+auth      # start, leave running
    python scripts/deploy.py run -- num_rounds=3               # run on the running federation
    python scripts/deploy.py status
    python scripts/deploy.py down

See docs/deployment.md (multi-machine recipe, privacy modes, faults).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedpriv.deploy import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
