"""Test hook (put this folder on PYTHONPATH): once the file FFT_DIST_TEST_SLOW_EVAL names exists, every
eval batch of a rank takes 2 s more, so a stop signal reliably lands in the middle of an evaluation."""
import os
import time

_flag = os.environ.get("FFT_DIST_TEST_SLOW_EVAL")
if _flag and "RANK" in os.environ:
    import fft_dist.evaluation as _evaluation

    _collate = _evaluation.collate

    def _slow_collate(*args, **kwargs):
        if os.path.exists(_flag):
            time.sleep(2.0)
        return _collate(*args, **kwargs)

    _evaluation.collate = _slow_collate
