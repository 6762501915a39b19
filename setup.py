"""facecompat: compatible face-embedding upgrades (BCT, MixBCT, FCT) at MS1Mv3 scale."""

from setuptools import find_packages, setup

# torch is deliberately unpinned beyond a floor: install the build you want first
# (tools/env.sh installs the CPU wheel on machines without a GPU) so that pip does not
# pull several GB of CUDA packages to satisfy a bare requirement.
CORE = [
    "torch>=2.4",  # tested floor: dist.data_parallel passes what each DDP release accepts
    "numpy>=1.24",
    "pyyaml>=6.0",
    "opencv-python-headless>=4.8",
    "tqdm>=4.65",
    "matplotlib>=3.7",
    "tensorboard>=2.14",
]
# Backbone export to ONNX and its check against PyTorch (tools/export_onnx.py).
EXPORT = ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript>=0.1"]
DALI = "nvidia-dali-cuda120>=1.30"

setup(
    name="facecompat",
    version="0.1.0",
    description="Backward- and forward-compatible face embedding training and IJB-C cross-model evaluation",
    packages=find_packages(include=["facecompat", "facecompat.*"]),
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        "cpu": ["faiss-cpu>=1.7.4"],
        "gpu": ["faiss-gpu>=1.7.2", DALI],
        "dev": ["pytest>=7.4", "pytest-timeout>=2.1", "pytest-xdist>=3.5", "hypothesis>=6.80", "ruff>=0.4",
                "import-linter>=2.1", DALI, *EXPORT],
        "export": EXPORT,
    },
)
