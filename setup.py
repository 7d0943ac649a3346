"""dit_jax: Scalable Diffusion Models with Transformers (DiT) in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="dit_jax",
    version="0.1.0",
    description="DiT (Peebles & Xie, 2023) in JAX/Flax for TPU pods and GPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dit_jax", "dit_jax.*"]),
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",      # tf.data only (the input pipeline)
        "tensorflow-datasets>=4.9",  # ImageNet / image datasets for latent preparation
        "ml-collections>=0.1.1",
        "clu>=0.0.12",
        "tensorboard>=2.16",         # clu's summary writers need it
        "numpy",
        "scipy",                     # FID matrix square root
        "pillow",
        "safetensors",               # reading diffusers VAE weights without torch
        "scikit-learn",              # ships the digits of the demo; the proxy FID's classifier
        "matplotlib",                # the scaling grid's figures (python -m dit_jax.grid report)
        "diffrax>=0.7.2",            # the flow objective's ODE/SDE solves (dit_jax.flow)
    ],
    # The entry points, also as commands (python -m dit_jax.main etc. work the same).
    entry_points={"console_scripts": [
        "dit-train = dit_jax.main:run",
        "dit-sample = dit_jax.sample:run",
        "dit-evaluate = dit_jax.evaluate:run",
        "dit-grid = dit_jax.grid.__main__:run",
        "dit-aot = dit_jax.aot:run",
        "dit-convert = dit_jax.convert:run",
        "dit-prepare-latents = dit_jax.prepare_latents:run",
        "dit-model-table = dit_jax.model_table:main",
        "dit-inspect = dit_jax.inspection:run",
    ]},
    extras_require={
        # Parity references for the tests. The pinned torch is a CPU build where it is on disk;
        # an unpinned torch pulls a multi-GB CUDA build.
        # jax[tpu] brings libtpu at the installed jax's version: tests compile train steps for
        # TPU topologies (jax.experimental.topologies) on a CPU-only machine; no TPU is used.
        # torch-fidelity (the FID Inception reference) is not here: every release declares
        # torchvision, whose wheel for torch 2.13 is a CUDA build that fails to import on the CPU
        # torch and then breaks diffusers' imports. README's test command installs it --no-deps.
        # transformers: the DINOv2 reference of dit_jax.encoders (REPA's encoder).
        # torchdiffeq: SiT's ODE solver, the reference of the flow samplers' heun2 and dopri5.
        # pytest-xdist: the suite runs in 2 worker processes (README's `-n 2`).
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "diffusers", "transformers", "jax[tpu]",
                 "torchdiffeq"],
        # Reading the released .pt checkpoints (dit_jax.convert) and Inception weights.
        "torch": ["torch"],
        # TPU VMs, and AOT compilation for TPU topologies on any machine (python -m dit_jax.aot).
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
