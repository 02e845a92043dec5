"""mitmproxy entry script: `mitmdump -s addon/bridge.py`.

mitmproxy puts this file's folder on `sys.path` while it loads the script, so
the `responses_ws_bridge` package beside it imports whether or not it was
installed. A mitmproxy the bridge cannot run in gets one error line (mitmproxy
then stops: it exits on errors logged at startup) instead of a traceback.
"""

import logging

from responses_ws_bridge.mitmproxy_support import startup_problem

problem = startup_problem()
if problem is None:
    from responses_ws_bridge.addons import bridge_addons

    addons = bridge_addons()
else:
    logging.getLogger("responses_ws_bridge").error("Responses bridge not loaded: %s", problem)
    addons = []
