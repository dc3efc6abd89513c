"""The Beam tests run in their own environment (``.venv-beam``: apache-beam needs protobuf < 7); see the Makefile."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
