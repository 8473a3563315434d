from setuptools import find_packages, setup

setup(
    name='act_jax',
    version='0.1.0',
    description='Adaptive Computation Transformers in JAX/Flax: dynamic depth and mixture '
                'of experts, with inference that really skips compute.',
    packages=find_packages(include=['act_jax', 'act_jax.*', 'experiments', 'experiments.*']),
    python_requires='>=3.10',
    install_requires=[
        'jax>=0.4.35',
        'flax>=0.12.0',  # qwix needs it
        'optax>=0.2.3',
        'orbax-checkpoint>=0.11.0',
        'tensorstore>=0.1.65',
        'chex>=0.1.87',
        'absl-py>=2.1.0',
        'ml-collections>=0.1.1',
        'numpy>=1.26',
        'tensorboardX>=2.6',
        'matplotlib>=3.8',
        # int8 / int4 quantization (act_jax/model/quant.py): QArray, einsum, ragged_dot, tiles
        'qwix>=0.1.8',
        # the HTTP server (experiments.serve --listen, act_jax/serve/server.py)
        'starlette>=0.37',
        'uvicorn>=0.29',
        'prometheus_client>=0.20',
        # the load generator (experiments.loadgen)
        'httpx>=0.27',
    ],
    extras_require={
        # pytest-xdist: the suite runs on 2 workers (pytest.ini; docs/testing.md)
        # filelock: the test workers share one compile cache; jax locks it only with filelock
        # openai: a real client of the HTTP server in tests/test_server.py
        'test': ['pytest>=8.0', 'pytest-xdist>=3.5', 'nbclient>=0.10', 'nbformat>=5.10',
                 'ipykernel>=6.29', 'scipy>=1.11', 'filelock>=3.12', 'openai>=1.0'],
        'colab': ['treescope>=0.1.5', 'nbformat>=5.10'],
        # TPU runtime; on a CPU machine it lets experiments.compile compile for named TPU
        # topologies (jax.experimental.topologies) without a TPU.
        'tpu': ['libtpu>=0.0.40'],
    },
)
