"""Build edgecc: the Python packages and the Cython extensions.

Every ``.pyx`` under ``media_core/`` and ``appliance/`` becomes one extension, compiled with
``-O2``. ``EDGECC_DEBUG=1`` builds with line tracing, assertions and annotated HTML instead.
``EDGECC_ONLY=path/a.pyx,path/b.pyx`` limits a build to the named sources (useful while one
extension is being edited).
"""

import os
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).parent
DEBUG = os.environ.get("EDGECC_DEBUG") == "1"
ONLY = [p.strip() for p in os.environ.get("EDGECC_ONLY", "").split(",") if p.strip()]


def _extensions() -> list[Extension]:
    sources = sorted(
        str(p.relative_to(HERE))
        for pkg in ("media_core", "appliance")
        for p in (HERE / pkg).rglob("*.pyx")
    )
    if ONLY:
        sources = [s for s in sources if s in ONLY]
    macros = [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")]
    if DEBUG:
        macros += [("CYTHON_TRACE_NOGIL", "1")]
        cflags = ["-O0", "-g"]
    else:
        macros += [("NDEBUG", "1")]
        cflags = ["-O2"]
    return [
        Extension(
            src[:-4].replace("/", "."),
            [src],
            include_dirs=[numpy.get_include()],
            define_macros=macros,
            extra_compile_args=cflags + ["-Wno-unused-function", "-Wno-unreachable-code"],
            libraries=["m"],
        )
        for src in sources
    ]


setup(
    name="edgecc",
    version="0.1.0",
    description="Hybrid contact center: on-site appliance, edge agent and cloud bridge",
    packages=find_packages(include=["media_core*", "appliance*", "edge_agent*", "cloud_bridge*", "proto*"]),
    package_data={"": ["*.pxd", "*.pyi", "*.proto", "*.h"], "appliance": [
        "data/prompts/*.wav", "data/sipp/*.xml", "web/*.html", "web/*.js", "web/*.css"]},
    python_requires=">=3.11",
    install_requires=[
        "numpy>=1.26",
        "pydantic>=2.6",
        "PyYAML>=6.0",
        "sqlite-utils>=3.36",
        "cryptography>=42",
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "grpcio>=1.85.1",
        "grpcio-health-checking>=1.85.1",
        "grpcio-reflection>=1.85.1",
        "protobuf>=7.35.1",
        "psycopg[binary]>=3.1",
        "websockets>=13",
        "httptools>=0.6",
    ],
    extras_require={
        "test": [
            "grpcio-tools>=1.85.1",
            "schemathesis>=4.0",
            "pytest>=8.0",
            "pytest-timeout>=2.2",
            "pytest-xdist>=3.5",
            "hypothesis>=6.100",
            "pjsua2-python>=2.14",
            "ruff>=0.5",
        ],
    },
    ext_modules=cythonize(
        _extensions(),
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": DEBUG,
            "initializedcheck": DEBUG,
            "cdivision": True,
            "linetrace": DEBUG,
            "profile": False,
        },
        quiet=True,
    ),
    entry_points={"console_scripts": ["edgecc=appliance.cli:main"]},
    zip_safe=False,
)
