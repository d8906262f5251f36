"""Test-only: make checkpoint saves slow (a slow network filesystem), so a test can kill -9 mid-save.
Put this folder on PYTHONPATH and set SLOW_SAVE_SECONDS."""
import os

if os.environ.get("SLOW_SAVE_SECONDS"):
    import time

    import safetensors.torch as st

    _save_file = st.save_file

    def slow_save_file(*args, **kwargs):
        _save_file(*args, **kwargs)
        time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))

    st.save_file = slow_save_file
