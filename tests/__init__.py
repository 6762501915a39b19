"""facecompat's tests, a package per layer of the library (and tools/ for the scripts); shared helpers in
``tests.helpers``."""
