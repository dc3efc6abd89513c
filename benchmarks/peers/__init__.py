"""Speed and agreement against the peer libraries (``make bench-peers``); see ``run_peers.py``."""
