"""Quiet start: TensorFlow's C++ start-up lines on a CPU machine (absl's pre-initialisation notice, oneDNN,
"Could not find cuda drivers", CPU-feature guard, "failed call to cuInit") are written to file descriptor 2
before absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` cannot filter them. TensorFlow is
imported (and its platforms initialised) with descriptor 2 pointing at a temporary file; every other line
written meanwhile (a real warning) is passed on to stderr."""

from __future__ import annotations

import os
import re
import sys
import tempfile

CHATTER = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:. ]+\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_diagnostics"
    rb"|cuda_dnn|cuda_fft|cuda_blas|gpu_device|gpu_cudamallocasync_allocator)\.cc:\d+\] .*"
    rb"|To enable the following instructions: .*in other operations, rebuild TensorFlow with the appropriate compiler flags\.)$"
)


def import_tensorflow_quietly():
    """Import TensorFlow (and list its devices, which probes CUDA) with the start-up chatter dropped."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf  # inside the redirect: this is the point of the function

            tf.config.list_physical_devices()
            # No op may run here: a multi-worker strategy must configure collective ops before the first one.
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines() if line.strip() and not CHATTER.match(line)]
    if kept:
        sys.stderr.buffer.write(b"\n".join(kept) + b"\n")
        sys.stderr.flush()
