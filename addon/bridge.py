"""mitmproxy entry script: `mitmdump -s addon/bridge.py`.

Loaded by path, so the repository root is put on sys.path for the `addon`
package when it is not installed (e.g. a system-wide mitmproxy).
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from addon.bridge_addon import ResponsesBridge  # noqa: E402

addons = [ResponsesBridge()]
