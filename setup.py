"""lookalike: visually similar items from SigLIP embeddings, on Apache Beam.

Beam ships this package to remote workers with `--setup_file ./setup.py`.
Exact, tested versions are pinned in requirements.txt (what `make install` uses);
the ranges here are what the code needs.
"""

from setuptools import find_packages, setup

setup(
    name="lookalike",
    version="0.1.0",
    description="Visually similar item recommendations: SigLIP embeddings, ANN snapshots, offline evaluation.",
    python_requires=">=3.10",
    packages=find_packages(
        include=[
            "encoder",
            "encoder.*",
            "pipelines",
            "pipelines.*",
            "indexing",
            "indexing.*",
            "evaluation",
            "evaluation.*",
            "training",
            "training.*",
        ]
    ),
    install_requires=[
        "apache-beam[gcp]>=2.77,<2.78",
        "torch>=2.13,<2.15",
        "transformers>=5.24,<6",
        "safetensors>=0.8",
        "tokenizers>=0.23",
        "sentencepiece>=0.2",
        "huggingface_hub>=2.4",
        "pyarrow>=25,<26",
        "numpy>=2.4,<2.5",
        "protobuf>=6.33,<6.34",
        "google-cloud-storage>=3.17,<4",
        "pycurl>=7.45",  # image reads from gs:// (encoder/object_http.py)
        "pillow>=12",
        "scipy>=1.17",
        "typer>=0.29",
        "rich>=15",
        "pyyaml>=6",
        "faiss-cpu>=1.15,<1.16",
        "scann>=1.4,<1.5",
        "fastapi>=0.165",
        "uvicorn>=0.54",
        "tqdm>=4.70",  # progress bars (training, evaluation)
    ],
    extras_require={
        # GPU workers only: GPU JPEG decode. torchvision breaks transformers' SigLIP import beside the CPU torch.
        # encoder/nvimgcodec.py mirrors nvImageCodec 0.9's C header: another minor version is refused.
        "gpu": ["torchvision==0.28.*", "nvidia-nvimgcodec-cu13[nvjpeg]==0.9.*"],
        "dev": ["pytest>=9", "hypothesis>=6.170", "gcp-storage-emulator>=2026.7", "ruff>=0.17", "scikit-image>=0.26"],
    },
    entry_points={"console_scripts": ["lookalike=pipelines.cli:main"]},
)
