"""Generates the gRPC bindings from proto/ during every build, so they are never committed."""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithProto(build_py):
    def run(self) -> None:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py")], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithProto})
