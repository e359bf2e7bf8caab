import os
import sys

# Tests run against the in-tree package (python/), with the freshly built _native.abi3.so.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
