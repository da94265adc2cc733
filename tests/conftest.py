import os

# Tests run in the tiny profile unless the caller chose otherwise.
os.environ.setdefault("SEPREFORMER_PROFILE", "ci")
