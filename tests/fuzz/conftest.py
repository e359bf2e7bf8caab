"""Puts the repository's fuzz/ folder (pyfuzz and its mutators) on sys.path."""

import os
import sys

FUZZ_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "fuzz")
if FUZZ_DIR not in sys.path:
    sys.path.insert(0, FUZZ_DIR)
