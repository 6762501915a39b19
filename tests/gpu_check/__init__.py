"""facecompat.gpu_check: the GPU check's steps."""
