"""Generates the gRPC stubs from proto/ whenever the package is built or installed.

The stubs are build outputs (git-ignored), so every install path — `pip install .`,
`pip install -e .`, the Dockerfile — runs protoc here rather than relying on committed files.
"""

import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def generate_stubs() -> None:
    import grpc_tools  # build-time dependency, see [build-system]
    from grpc_tools import protoc

    proto_root = ROOT / "proto"
    out = ROOT / "service"
    protos = sorted(str(p.relative_to(proto_root)) for p in proto_root.rglob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    for pkg in {(out / p).parent for p in protos}:
        (pkg / "__init__.py").touch()


class BuildWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


if __name__ == "__main__" and sys.argv[1:] == ["proto"]:
    generate_stubs()  # `make proto`: regenerate in place without a build
else:
    setup(cmdclass={"build_py": BuildWithStubs})
