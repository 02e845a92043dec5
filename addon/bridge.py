"""mitmproxy entry script: `mitmdump -s addon/bridge.py`.

mitmproxy puts this file's folder on `sys.path` while it loads the script, so
the `responses_ws_bridge` package beside it imports whether or not it was
installed.
"""

from responses_ws_bridge.addons import bridge_addons

addons = bridge_addons()
